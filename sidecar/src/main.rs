//! The `airlock` command line: parses arguments and calls the library.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock::config::Config;
use airlock::lifecycle::State;
use airlock::queue::Queue;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// Exit status for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Airlock: a transactional write-queue sidecar between AI agents and databases.
#[derive(Debug, Parser)]
#[command(name = "airlock", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar: watch the intent directory, decide, apply, report.
    Run(RunArgs),
    /// Run Airlock on its defaults in a fresh directory with the example intents.
    Demo {
        /// Where to run (default: a new directory under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Validate intent files, then write them into the intent directory atomically
    /// ("-" reads stdin); with --wait, wait for their outcomes.
    ///
    /// Every file is checked first, as `airlock run` would check it (with the
    /// configuration's limits, and its targets when --config is given); if any is
    /// not a valid intent, its problems are printed as FILE: /pointer: message and
    /// nothing is written. Each file is written under a temporary dotfile name, then
    /// renamed to <id>.json. The written paths are printed; with --wait, each final
    /// outcome instead, one JSON document per line.
    #[command(after_help = airlock::submit::exit_status_help())]
    Submit {
        /// Intent files to submit ("-" reads standard input).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Configuration file (TOML), for its directories, limits and targets.
        #[arg(long, env = "AIRLOCK_CONFIG")]
        config: Option<PathBuf>,
        /// The intent directory (default: the configuration's, ./intents). It must
        /// exist, unless --create is given.
        #[arg(long)]
        intents: Option<PathBuf>,
        /// Make the intent directory (mode 0755) if it is missing.
        #[arg(long)]
        create: bool,
        /// Wait until every intent's outcome is final, print each one and exit with
        /// its state's status (the highest, with several files).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds, before it exits with status 75.
        #[arg(long, value_name = "SECONDS", default_value_t = 300, requires = "wait")]
        timeout: u64,
        /// The results directory --wait reads (default: <intents>/results).
        #[arg(long)]
        results: Option<PathBuf>,
    },
    /// Approve an intent that awaits review.
    Approve {
        /// The intent id.
        id: String,
        /// Who approves (recorded in the run log).
        #[arg(long = "as", default_value_t = default_reviewer())]
        reviewer: String,
        /// The digest being approved; refused if it is not the intent's (default:
        /// not compared).
        #[arg(long)]
        digest: Option<String>,
        /// The digest of the preview you reviewed (the review page's, or one this
        /// command printed); refused if the rows changed since (default: the
        /// preview printed now is the one approved).
        #[arg(long)]
        preview_digest: Option<String>,
        /// The default target database, as given to `airlock run`, to preview the
        /// intent's rows on: sqlite://PATH or postgres://USER@HOST/DB?OPTIONS
        /// (default: the configuration's `targets.default`, else
        /// sqlite://<state>/target.db).
        #[arg(long)]
        target: Option<String>,
        /// A comment for the record (default: none).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Reject an intent that awaits review.
    Reject {
        /// The intent id.
        id: String,
        /// Why (the agent sees this).
        #[arg(long)]
        reason: String,
        /// Who rejects (recorded in the run log).
        #[arg(long = "as", default_value_t = default_reviewer())]
        reviewer: String,
        /// The digest being rejected; refused if it is not the intent's.
        #[arg(long)]
        digest: Option<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List the queue: intents, and files refused at intake (state `invalid`).
    Status {
        /// Only this run (default: every run).
        #[arg(long)]
        run: Option<String>,
        /// Only this state: queued, awaiting_review, approved, applied, denied,
        /// rejected, expired, failed, undone, or invalid for refused files (default:
        /// every state).
        #[arg(long = "in")]
        in_state: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Print the intent JSON Schema (with --outcome, the outcome file's).
    Schema {
        /// Print the JSON Schema of the outcome files Airlock writes back instead.
        #[arg(long)]
        outcome: bool,
    },
    /// Reviewer tokens for the review endpoint.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Create an Ed25519 signing key pair (PATH and PATH.pub, PEM).
    Keygen {
        /// Where to write the private key (mode 0600); the public key goes to PATH.pub.
        #[arg(long)]
        out: PathBuf,
    },
    /// List runs with their intents counted by state.
    Runs {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Verify run logs with only the public key: signatures, hash chains, sequence,
    /// payload digests and lifecycle. Exit status 1 on any failure.
    Verify {
        /// The sidecar's public key (PEM, SubjectPublicKeyInfo).
        #[arg(long)]
        public_key: PathBuf,
        /// An exported run log (JSON Lines) to verify.
        #[arg(conflicts_with = "state", required_unless_present = "state")]
        file: Option<PathBuf>,
        /// Verify the live log in this state directory instead (records after the
        /// last checkpoint are warnings, not failures).
        #[arg(long)]
        state: Option<PathBuf>,
        /// A run head published elsewhere, RUN:SEQ:sha256:HEX, that the log must
        /// contain (catches a log cut back to an earlier checkpoint). Repeatable.
        #[arg(long = "expect-head")]
        expect_head: Vec<String>,
    },
    /// Policy authors' tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Revert a run's applied intents in their targets (reverse apply order, one
    /// transaction per target). Exit status 1 on conflicts or a refused --intent.
    Undo(UndoArgs),
    /// Apply a run's applied intents, from its verified log, to another (existing)
    /// database, with the values the database generated for them (keys, defaults);
    /// intents undone in the run are skipped unless --include-undone. Exit status 1
    /// if the log does not verify or (with --check) the rows diverge.
    Replay(ReplayArgs),
    /// Write one run's log as JSON Lines (records, checkpoints, intent envelopes).
    Export {
        /// The run to export.
        #[arg(long)]
        run: String,
        /// The file to write ("-" for standard output).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Print the policy input document for an intent file and the configured policy's
    /// decision on it. Exit status 1 if the intent is invalid or the policy cannot
    /// decide.
    Eval {
        /// The intent file.
        intent: PathBuf,
        /// Configuration file (TOML), for its [policy] section.
        #[arg(long, env = "AIRLOCK_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// A .rego file or a directory of policies, instead of the configured policy
    /// (default: the configuration's `policy`, else the built-in policy).
    #[arg(long, conflicts_with = "policy_url")]
    policy: Option<PathBuf>,
    /// An Open Policy Agent Data API URL, e.g.
    /// http://127.0.0.1:8181/v1/data/airlock/authz, instead of the configured policy
    /// (default: the configuration's `policy.url`, else none).
    #[arg(long)]
    policy_url: Option<String>,
}

impl PolicyArgs {
    /// Flags beat the configuration: either one replaces whatever it said.
    fn apply(self, config: &mut Config) {
        if let Some(path) = self.policy {
            config.policy.path = Some(path);
            config.policy.url = None;
            config.policy.bearer_token_file = None;
        }
        if let Some(url) = self.policy_url {
            config.policy.url = Some(url);
            config.policy.path = None;
        }
    }
}

/// `airlock run`'s flags. Each one overrides the configuration (the file, then
/// `AIRLOCK_*` variables), whose own defaults the help texts name.
#[derive(Debug, Args)]
struct RunArgs {
    /// Configuration file (TOML) (default: none, only AIRLOCK_* variables and defaults).
    #[arg(long, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// The intent directory (default: the configuration's `intents`, else ./intents).
    #[arg(long)]
    intents: Option<PathBuf>,
    /// The results directory (default: the configuration's `results`, else
    /// <intents>/results).
    #[arg(long)]
    results: Option<PathBuf>,
    /// The state directory (default: the configuration's `state`, else ./.airlock).
    #[arg(long)]
    state: Option<PathBuf>,
    /// The default target database: sqlite://PATH or postgres://USER@HOST/DB?OPTIONS
    /// (default: the configuration's `targets.default`, else
    /// sqlite://<state>/target.db).
    #[arg(long)]
    target: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Check everything `airlock run` needs and print what was found (directories,
    /// key, targets with their database role, policy, review listener), creating
    /// nothing; then exit: 0 if Airlock would start, 64 if not.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
struct UndoArgs {
    /// The run to undo.
    #[arg(long)]
    run: String,
    /// Undo only this intent of the run (default: every applied intent of the run).
    #[arg(long)]
    intent: Option<String>,
    /// Revert rows even if they changed since they were applied (recorded as forced).
    #[arg(long)]
    force: bool,
    /// Who undoes (recorded in the run log).
    #[arg(long = "as", default_value_t = default_reviewer())]
    by: String,
    /// Configuration file (TOML), for its state directory and targets (default: none,
    /// only AIRLOCK_* variables and defaults).
    #[arg(long, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// The state directory (default: the configuration's `state`, else ./.airlock).
    #[arg(long)]
    state: Option<PathBuf>,
    /// The default target database, as given to `airlock run`: sqlite://PATH or
    /// postgres://USER@HOST/DB?OPTIONS (default: the configuration's
    /// `targets.default`, else sqlite://<state>/target.db).
    #[arg(long)]
    target: Option<String>,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The run to replay.
    #[arg(long)]
    run: String,
    /// The database to replay into: sqlite://PATH or postgres://USER@HOST/DB?OPTIONS
    /// (required; it must exist: a missing SQLite file is an error, and is not
    /// created; it gets a ledger of its own).
    #[arg(long)]
    target: String,
    /// Compare each resulting row with the recorded after-image; exit 1 on any
    /// divergence.
    #[arg(long)]
    check: bool,
    /// Also apply the intents the run's log records as undone (skipped by
    /// default: their rows were reverted).
    #[arg(long)]
    include_undone: bool,
    /// An exported run log (JSON Lines).
    #[arg(conflicts_with = "state", required_unless_present = "state")]
    file: Option<PathBuf>,
    /// The sidecar's public key (PEM), to verify the log (required with FILE; default
    /// with --state: <state>/signing.key.pub).
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// Replay from the live log in this state directory instead of FILE (default:
    /// none, give FILE or --state).
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a new token, add its hash to the tokens file and print the token once.
    Add {
        /// Who holds it (recorded with each decision they make).
        #[arg(long)]
        name: String,
        /// viewer (read), approver (also decide) or admin (also undo).
        #[arg(long)]
        role: String,
        /// The tokens file; by default `[review] tokens`, else <state>/review-tokens.toml.
        #[arg(long)]
        tokens: Option<PathBuf>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Print the SHA-256 of a token read from standard input, as the tokens file
    /// lists it (for writing the file, or a Kubernetes Secret, by hand).
    Hash,
}

#[derive(Debug, Args)]
struct StateArgs {
    /// Configuration file (TOML), for its state directory (default: none, only
    /// AIRLOCK_* variables and defaults).
    #[arg(long, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// The state directory (default: the configuration's `state`, else ./.airlock).
    #[arg(long)]
    state: Option<PathBuf>,
}

fn default_reviewer() -> String {
    std::env::var("USER")
        .map(|user| format!("cli:{user}"))
        .unwrap_or_else(|_| "cli".to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its logs would only interleave with it.
    let default_log = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    airlock::telemetry::init_logging(default_log);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("airlock: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => {
            // Catch SIGTERM and SIGINT before anything else, so a stop that arrives
            // during start-up still drains cleanly instead of killing the process.
            let runtime = runtime()?;
            let shutdown = {
                let _context = runtime.enter();
                shutdown_signal()
            };
            use airlock::daemon::{Mode, Preflight, Resources};
            let check = args.check;
            let config = match load_run_config(args) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("airlock: {error:#}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            // Everything that can fail without leaving a trace is checked before
            // anything is created: a start that fails here leaves the disk as it was.
            let mode = if check { Mode::Check } else { Mode::Start };
            let preflight = runtime.block_on(Preflight::run(&config, mode));
            if check {
                return Ok(print_check(&preflight));
            }
            if !preflight.ok() {
                for problem in preflight.problems() {
                    eprintln!("airlock: cannot start: {problem}");
                }
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            let resources = match Resources::create(config, preflight) {
                Ok(resources) => resources,
                Err(error) => {
                    eprintln!("airlock: cannot start: {error}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            if let Err(error) = runtime.block_on(airlock::daemon::run(resources, shutdown)) {
                eprintln!("airlock: cannot start: {error}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir } => {
            runtime()?.block_on(airlock::demo::run(dir))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            files,
            config,
            intents,
            create,
            wait,
            timeout,
            results,
        } => {
            let mut loaded = match Config::load(config.as_deref(), std::env::vars()) {
                Ok(loaded) => loaded,
                Err(error) => {
                    eprintln!("airlock: {error}");
                    return Ok(ExitCode::from(airlock::submit::EXIT_CONFIG));
                }
            };
            if let Some(intents) = intents {
                loaded.intents = intents;
            }
            if let Some(results) = results {
                loaded.results = Some(results);
            }
            let options = airlock::submit::Options {
                create,
                wait: wait.then(|| std::time::Duration::from_secs(timeout)),
                ..airlock::submit::Options::from_config(files, &loaded, config.is_some())
            };
            let stdin: &mut dyn Read = &mut std::io::stdin().lock();
            let status = airlock::submit::submit(
                &options,
                stdin,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            );
            Ok(ExitCode::from(status))
        }
        Command::Approve {
            id,
            reviewer,
            digest,
            preview_digest,
            target,
            comment,
            state,
        } => approve(
            &id,
            &reviewer,
            digest.as_deref(),
            preview_digest.as_deref(),
            target,
            comment.as_deref(),
            state,
        ),
        Command::Reject {
            id,
            reason,
            reviewer,
            digest,
            state,
        } => {
            let mut queue = open_queue(state)?;
            let state =
                airlock::review::reject(&mut queue, &id, &reviewer, digest.as_deref(), &reason)?;
            println!("{id}: {state}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            run,
            in_state,
            json,
            state,
        } => status(run.as_deref(), in_state.as_deref(), json, state),
        Command::Schema { outcome } => {
            if outcome {
                print!("{}", airlock_intent::OUTCOME_SCHEMA);
            } else {
                print!("{}", airlock_intent::SCHEMA);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            public_key,
            file,
            state,
            expect_head,
        } => {
            use airlock::verify::{ExpectedHead, Mode, Options};
            let key = airlock::seal::Verifier::load(&public_key)?;
            let expected_heads = expect_head
                .iter()
                .map(|h| h.parse::<ExpectedHead>())
                .collect::<Result<Vec<_>, _>>()?;
            let report = match (file, state) {
                (Some(file), _) => {
                    let bytes = std::fs::read(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let options = Options {
                        mode: Mode::Export,
                        expected_heads,
                    };
                    airlock::verify::verify_export(&bytes, &key, &options)
                }
                (None, Some(state)) => {
                    let queue = open_queue(StateArgs {
                        config: None,
                        state: Some(state),
                    })?;
                    let lines = queue.export_lines(None)?;
                    let options = Options {
                        mode: Mode::Live,
                        expected_heads,
                    };
                    airlock::verify::verify(lines.iter().map(Vec::as_slice), &key, &options)
                }
                (None, None) => anyhow::bail!("give an exported FILE or --state DIR"),
            };
            println!("{report}");
            for warning in report.all_warnings() {
                eprintln!("warning: {warning}");
            }
            for failure in report.all_failures() {
                eprintln!("failure: {failure}");
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Token(command) => token(command),
        Command::Keygen { out } => {
            let verifier = airlock::seal::keygen(&out)?;
            println!("private key  {} (mode 0600)", out.display());
            println!(
                "public key   {}",
                airlock::seal::public_key_path(&out).display()
            );
            println!("keyid        {}", verifier.keyid());
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { json, state } => {
            let queue = open_queue(state)?;
            let runs = queue.runs()?;
            if json {
                for run in &runs {
                    println!("{}", serde_json::to_string(run)?);
                }
            } else {
                println!("{:<28} {:>8}  counts by state", "run", "records");
                for run in &runs {
                    let counts = run
                        .counts
                        .iter()
                        .map(|(state, n)| format!("{state}={n}"))
                        .collect::<Vec<_>>()
                        .join(" ");
                    println!("{:<28} {:>8}  {counts}", run.run, run.records);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Eval {
            intent,
            config,
            policy,
        }) => policy_eval(&intent, config.as_deref(), policy),
        Command::Undo(args) => undo(args),
        Command::Replay(args) => replay(args),
        Command::Export { run, out, state } => {
            let (mut queue, sealed) = open_queue_sealed(state)?;
            if !sealed {
                anyhow::bail!(
                    "export needs the signing key to seal the run's head; use --config or the key in the state directory"
                );
            }
            if !queue.runs()?.iter().any(|r| r.run == run) {
                anyhow::bail!("no run named {run:?} (see `airlock runs`)");
            }
            queue.seal_due(true)?;
            let mut bytes = Vec::new();
            for line in queue.export_lines(Some(&run))? {
                bytes.extend_from_slice(&line);
                bytes.push(b'\n');
            }
            if out.as_os_str() == "-" {
                use std::io::Write;
                std::io::stdout().write_all(&bytes)?;
            } else {
                std::fs::write(&out, &bytes)
                    .with_context(|| format!("writing {}", out.display()))?;
                eprintln!("exported run {run} to {}", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Most rows `airlock status` lists of intents, and of refused files.
const STATUS_LIMIT: usize = 10_000;

/// `airlock status`: queued intents and refused files (state `invalid`, kept in the
/// queue's own table), oldest first, as an aligned table or as outcome documents.
fn status(
    run: Option<&str>,
    in_state: Option<&str>,
    json: bool,
    state: StateArgs,
) -> Result<ExitCode> {
    use airlock::outcome::Outcome;
    // `invalid` is not an intent state: refused files never became intents.
    let (intents, refused, filter) = match in_state {
        None => (true, true, None),
        Some("invalid") => (false, true, None),
        Some(name) => {
            let state = name.parse::<State>().with_context(|| {
                let names: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
                format!("--in {name:?}: use one of {}, invalid", names.join(", "))
            })?;
            (true, false, Some(state))
        }
    };
    let queue = open_queue(state)?;
    // (received at, table row, outcome document)
    let mut rows: Vec<(i64, [String; 7], Outcome)> = Vec::new();
    if intents {
        for row in queue.list(run, filter, STATUS_LIMIT)? {
            let cells = [
                row.seq.to_string(),
                airlock::clock::timestamp(row.received_at),
                row.id.clone(),
                row.run.clone(),
                row.state.to_string(),
                row.target.clone(),
                row.file.clone(),
            ];
            let outcome = if json {
                Outcome::of_queued(&queue, &row)?
            } else {
                Outcome::of_intent(&row, &[])
            };
            rows.push((row.received_at, cells, outcome));
        }
    }
    if refused {
        for row in queue.refused(run, STATUS_LIMIT)? {
            let cells = [
                "-".to_owned(),
                airlock::clock::timestamp(row.received_at),
                row.id.clone().unwrap_or_else(|| "-".to_owned()),
                row.run.clone().unwrap_or_else(|| "-".to_owned()),
                "invalid".to_owned(),
                "-".to_owned(),
                row.file.clone(),
            ];
            rows.push((row.received_at, cells, Outcome::of_refusal(&row)));
        }
    }
    // Stable: intents before refusals received in the same millisecond.
    rows.sort_by_key(|(at, _, _)| *at);
    if json {
        for (_, _, outcome) in &rows {
            println!("{}", serde_json::to_string(outcome)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let header = ["seq", "received", "id", "run", "state", "target", "file"].map(str::to_owned);
    // Ids, runs and file names are the agent's: escaped, so none can break a line
    // or the columns.
    let table: Vec<[String; 7]> = std::iter::once(header)
        .chain(rows.into_iter().map(|(_, cells, _)| cells))
        .map(|cells| cells.map(|cell| airlock::telemetry::escape_controls(&cell).into_owned()))
        .collect();
    let mut widths = [0usize; 7];
    for cells in &table {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for cells in &table {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

/// `airlock policy eval`: validates the intent, then prints
/// `{"input": ..., "decision": ...}`.
fn policy_eval(
    intent: &std::path::Path,
    config: Option<&std::path::Path>,
    flags: PolicyArgs,
) -> Result<ExitCode> {
    let mut config = Config::load(config, std::env::vars())?;
    flags.apply(&mut config);
    config.check()?;
    let bytes = std::fs::read(intent).with_context(|| format!("reading {}", intent.display()))?;
    let file = intent
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| intent.display().to_string());
    let policy = airlock::decide::Policy::new(&airlock::daemon::policy_options(&config.policy))?;
    let validator = airlock_intent::Validator::new(config.intent_limits());
    let runtime = runtime()?;
    let trial =
        match airlock::decide::try_intent(&bytes, &file, &validator, &policy, runtime.handle()) {
            Ok(trial) => trial,
            Err(airlock::decide::TrialError::Invalid(invalid)) => {
                eprintln!("airlock: {} is not a valid intent:", intent.display());
                for problem in &invalid.problems {
                    eprintln!("  {problem}");
                }
                return Ok(ExitCode::FAILURE);
            }
        };
    let decision = trial
        .decision
        .with_context(|| format!("policy {} could not decide", policy.identity()))?;
    let shown = serde_json::json!({"input": trial.input, "decision": decision});
    println!("{}", serde_json::to_string_pretty(&shown)?);
    Ok(ExitCode::SUCCESS)
}

/// `airlock approve`: previews the intent on its target (as the review page does),
/// prints the rows it touches, and approves them (the printed preview, or the one
/// `--preview-digest` names if the rows are still those).
fn approve(
    id: &str,
    reviewer: &str,
    digest: Option<&str>,
    preview_digest: Option<&str>,
    target: Option<String>,
    comment: Option<&str>,
    state: StateArgs,
) -> Result<ExitCode> {
    let (config, mut queue) = config_and_queue(state, target)?;
    let row = queue
        .intent(id)?
        .ok_or_else(|| airlock::queue::QueueError::NotFound(id.to_owned()))?;
    // Refused before the target is opened if the intent takes no vote now.
    airlock::review::check_vote(reviewer, comment)?;
    airlock::review::check_open(&row, digest, airlock::clock::now_ms())?;
    let url = config.targets.get(&row.target).with_context(|| {
        format!(
            "intent {id} is for target {:?}, which is not configured (use --config or --target)",
            row.target
        )
    })?;
    let target = airlock::apply::open_existing(&row.target, url)?;
    let shown = runtime()?
        .block_on(airlock::review::show(
            target.as_ref(),
            &row,
            config.apply.max_rows,
        ))
        .with_context(|| {
            format!("cannot preview intent {id}'s rows now, so it cannot be approved yet")
        })?;
    print_preview(&row.intent()?, &shown)?;
    let seen = preview_digest.unwrap_or(&shown.digest);
    let progress = airlock::review::approve(
        &mut queue,
        id,
        reviewer,
        digest,
        seen,
        &shown.digest,
        comment,
    )?;
    println!(
        "{id}: {} ({} of {} approvals)",
        progress.state, progress.approvals, progress.needed
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints what a reviewer approves: each op's rows before and after, and the digest.
fn print_preview(intent: &airlock_intent::Intent, shown: &airlock::review::Shown) -> Result<()> {
    match &shown.preview {
        Ok(preview) if preview.already => println!("already applied: approving writes nothing"),
        Ok(preview) => {
            for op in &preview.ops {
                let kind = intent.ops.get(op.index).map_or("?", |o| o.kind().as_str());
                let table = op.images.first().map_or("?", |i| i.table.as_str());
                println!("op {} ({kind} {table}): {} row(s)", op.index, op.rows);
                for image in &op.images {
                    println!("  before {}", serde_json::to_string(&image.before)?);
                    println!("  after  {}", serde_json::to_string(&image.after)?);
                }
            }
        }
        Err(error) => {
            println!("the intent would fail now: {error}");
            if let Some(detail) = &error.detail {
                println!("  {detail}");
            }
        }
    }
    println!("preview {}", shown.digest);
    Ok(())
}

/// The configuration (state and targets, no policy) and the queue, for a command
/// that works on queued intents and their target (`approve`, `undo`).
fn config_and_queue(state: StateArgs, target: Option<String>) -> Result<(Config, Queue)> {
    let config = load_run_config(RunArgs {
        config: state.config.clone(),
        intents: None,
        results: None,
        state: state.state,
        target,
        policy: PolicyArgs {
            policy: None,
            policy_url: None,
        },
        check: false,
    })?;
    let queue = open_queue(StateArgs {
        config: state.config,
        state: Some(config.state.clone()),
    })?;
    Ok((config, queue))
}

/// `airlock undo`.
fn undo(args: UndoArgs) -> Result<ExitCode> {
    use airlock::undo::{Outcome, Request};
    let (config, mut queue) = config_and_queue(
        StateArgs {
            config: args.config,
            state: args.state,
        },
        args.target,
    )?;
    let request = Request {
        run: args.run,
        intent: args.intent,
        force: args.force,
        by: args.by,
    };
    let targets = config.targets.clone();
    let open_target = move |name: &str| {
        let url = targets.get(name).ok_or_else(|| {
            airlock::undo::UndoError::NotFound(format!("no target named {name:?} is configured"))
        })?;
        airlock::apply::open_existing(name, url).map_err(|error| airlock::undo::UndoError::Target {
            target: name.to_owned(),
            error: Box::new(error),
        })
    };
    let outcome = runtime()?.block_on(airlock::undo::undo(&mut queue, open_target, &request))?;
    match outcome {
        Outcome::Nothing => {
            println!("run {}: nothing to undo (already undone)", request.run);
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Refused { intent_id, later } => {
            eprintln!(
                "airlock: refusing to undo intent {intent_id} alone: later intents of run {} wrote the same rows:",
                request.run
            );
            for write in &later {
                eprintln!(
                    "  intent {} table {} key {}",
                    write.intent_id,
                    write.table,
                    serde_json::to_string(&write.key)?
                );
            }
            eprintln!("undo the later intents first, or the whole run");
            Ok(ExitCode::FAILURE)
        }
        Outcome::Conflicts {
            target,
            undone,
            conflicts,
        } => {
            eprintln!(
                "airlock: undo of run {} refused: {} row(s) in target {target} changed since they were applied; nothing was changed there:",
                request.run,
                conflicts.len()
            );
            for conflict in &conflicts {
                eprintln!("  {conflict}");
            }
            if !undone.is_empty() {
                eprintln!("(already undone in earlier targets: {})", undone.join(", "));
            }
            eprintln!("rerun with --force to revert them anyway");
            Ok(ExitCode::FAILURE)
        }
        Outcome::Undone {
            reverted,
            recorded_only,
            forced,
        } => {
            for id in &reverted {
                println!("{id}: undone");
            }
            for id in &recorded_only {
                println!("{id}: undone (the target had reverted it already; recorded now)");
            }
            for conflict in &forced {
                println!("forced: {conflict}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `airlock replay`.
fn replay(args: ReplayArgs) -> Result<ExitCode> {
    use airlock::verify::{Mode, Options};
    let (lines, key_path, mode) = match (&args.file, &args.state) {
        (Some(file), _) => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let key = args
                .public_key
                .clone()
                .context("give --public-key PEM to verify the exported FILE")?;
            let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            let lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            (lines, key, Mode::Export)
        }
        (None, Some(state)) => {
            let queue = open_queue(StateArgs {
                config: None,
                state: Some(state.clone()),
            })?;
            let key = match &args.public_key {
                Some(key) => key.clone(),
                None => airlock::seal::public_key_path(&state.join("signing.key")),
            };
            (queue.export_lines(Some(&args.run))?, key, Mode::Live)
        }
        (None, None) => anyhow::bail!("give an exported FILE or --state DIR"),
    };
    let key = airlock::seal::Verifier::load(&key_path)
        .with_context(|| format!("loading the public key {}", key_path.display()))?;
    let report = airlock::verify::verify(
        lines.iter().map(Vec::as_slice),
        &key,
        &Options {
            mode,
            expected_heads: Vec::new(),
        },
    );
    if !report.ok() {
        eprintln!("airlock: the run log does not verify; refusing to replay it:");
        for failure in report.all_failures() {
            eprintln!("failure: {failure}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let options = airlock::replay::Options {
        check: args.check,
        include_undone: args.include_undone,
    };
    let outcome = runtime()?.block_on(airlock::replay::replay(
        &lines,
        &args.run,
        &args.target,
        &options,
    ))?;
    let mut replayed = 0;
    for intent in &outcome.intents {
        use airlock::replay::Step;
        let done = match intent.step {
            Step::Applied => "applied",
            Step::AlreadyReplayed => "already replayed",
            Step::SkippedUndone => "skipped: undone in the run (--include-undone replays it)",
        };
        if intent.step != Step::SkippedUndone {
            replayed += 1;
        }
        println!("{}: {done}", intent.id);
    }
    for divergence in &outcome.divergences {
        eprintln!("divergence: {divergence}");
    }
    if args.check {
        println!(
            "check: {replayed} intent(s), {} divergence(s)",
            outcome.divergences.len()
        );
    }
    Ok(if outcome.divergences.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `airlock run --check`: one line per thing checked (what was found on standard
/// output, a problem on standard error, in the same order), then the verdict; exit
/// status 0 if `airlock run` would start, 64 if not.
fn print_check(preflight: &airlock::daemon::Preflight) -> ExitCode {
    let width = preflight
        .findings
        .iter()
        .map(|f| f.subject.chars().count())
        .max()
        .unwrap_or(0);
    for finding in &preflight.findings {
        match &finding.result {
            Ok(found) => println!("{:<width$}  {found}", finding.subject),
            Err(problem) => eprintln!("{:<width$}  FAILED: {problem}", finding.subject),
        }
    }
    let problems = preflight.problems().count();
    if problems == 0 {
        println!("airlock run would start (this check created nothing)");
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "airlock run would not start: {problems} problem{} above (this check created nothing)",
            if problems == 1 { "" } else { "s" }
        );
        ExitCode::from(EXIT_CONFIG)
    }
}

fn load_run_config(args: RunArgs) -> Result<Config> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    let flags = [
        ("--intents", args.intents.is_some()),
        ("--results", args.results.is_some()),
        ("--state", args.state.is_some()),
        ("--target", args.target.is_some()),
        ("--policy", args.policy.policy.is_some()),
        ("--policy-url", args.policy.policy_url.is_some()),
    ];
    config.origin.flags = flags
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(flag, _)| flag.to_owned())
        .collect();
    if let Some(intents) = args.intents {
        config.intents = intents;
    }
    if let Some(results) = args.results {
        config.results = Some(results);
    }
    if let Some(state) = args.state {
        // The default target lives in the state directory; keep it there.
        if config.targets.get("default").map(String::as_str) == Some(DEFAULT_TARGET) {
            config.targets.insert(
                "default".into(),
                format!("sqlite://{}", state.join("target.db").display()),
            );
        }
        config.state = state;
    }
    if let Some(target) = args.target {
        config.targets.insert("default".into(), target);
    }
    args.policy.apply(&mut config);
    config.check()?;
    Ok(config)
}

const DEFAULT_TARGET: &str = "sqlite://./.airlock/target.db";

/// Opens the queue of an existing state directory, with the signing key when it can
/// be read, so records this command writes are checkpointed at once (otherwise the
/// daemon checkpoints them at its next step).
fn open_queue(args: StateArgs) -> Result<Queue> {
    Ok(open_queue_sealed(args)?.0)
}

fn open_queue_sealed(args: StateArgs) -> Result<(Queue, bool)> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(state) = args.state {
        config.state = state;
    }
    if !config.state.join("queue.db").exists() {
        anyhow::bail!(
            "no queue in {} (is this Airlock's state directory? use --state DIR)",
            config.state.display()
        );
    }
    let queue = Queue::open(&config.state)?;
    match airlock::seal::Sealer::load(&config.key_path()) {
        Ok(sealer) => Ok((
            queue.with_sealer(
                std::sync::Arc::new(sealer),
                airlock::daemon::checkpoint_policy(&config),
            ),
            true,
        )),
        Err(_) => Ok((queue, false)),
    }
}

/// Reviewer tokens are for the review endpoint, which a build without the `review`
/// feature lacks: say so rather than manage a file nothing reads.
#[cfg(not(feature = "review"))]
fn token(_command: TokenCommand) -> Result<ExitCode> {
    anyhow::bail!(
        "reviewer tokens are for the review endpoint, and this airlock was built without \
         the `review` feature; decide reviews with airlock approve/reject, or build \
         airlock with its default features"
    )
}

#[cfg(feature = "review")]
fn token(command: TokenCommand) -> Result<ExitCode> {
    use airlock::http::auth;
    match command {
        TokenCommand::Add {
            name,
            role,
            tokens,
            state,
        } => {
            let role: auth::Role = role.parse().map_err(anyhow::Error::msg)?;
            let path = match tokens {
                Some(path) => path,
                None => {
                    let mut config = Config::load(state.config.as_deref(), std::env::vars())?;
                    if let Some(dir) = state.state {
                        config.state = dir;
                    }
                    let path = config.tokens_path();
                    // A tokens file in the state directory: create the directory as
                    // `run` would (0700), and refuse one others could change.
                    if path.parent() == Some(config.state.as_path()) {
                        airlock::state::prepare(&config.state).with_context(|| {
                            format!("state directory {}", config.state.display())
                        })?;
                    }
                    path
                }
            };
            let existing = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let token = auth::new_token().context("no randomness for a token")?;
            let updated = format!("{existing}{}", auth::entry_toml(&name, role, &token));
            // Refuse to write a file the endpoint would refuse to read.
            auth::Tokens::parse(&updated)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            airlock::state::write_private(&path, updated.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            println!("{token}");
            eprintln!(
                "added {name} ({role}) to {}; the token above is shown only now",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Hash => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the token from standard input")?;
            let token = text.trim();
            anyhow::ensure!(!token.is_empty(), "no token on standard input");
            println!("{}", hex::encode(auth::token_hash(token)));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Registers for SIGTERM and SIGINT at once (it must be called inside the runtime)
/// and returns a future that completes when either arrives, even if it arrived
/// before the future was first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
