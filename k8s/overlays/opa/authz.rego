# OPA's own authorization policy (--authorization=basic): only a request carrying the
# token of the airlock-opa-token Secret may use OPA's API, so the agent, which shares
# the pod's loopback, can neither read nor replace the policy. The kubelet's probes
# reach /health on the diagnostic listener.
package system.authz

default allow := false

allow if {
	token := opa.runtime().env.OPA_TOKEN
	token != ""
	input.identity == token
}

allow if input.path == ["health"]
