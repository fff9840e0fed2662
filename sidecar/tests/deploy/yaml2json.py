#!/usr/bin/env python3
"""Reads a YAML stream (one or more documents) on standard input and prints them as
one JSON array, skipping empty documents. The deployment tests read Kubernetes
manifests and compose files with it (PyYAML, which kubernetes-validate brings)."""

import json
import sys

import yaml

documents = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
json.dump(documents, sys.stdout)
