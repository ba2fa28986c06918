//! `cfcli`: see the crate documentation of `cfcli` (cli/src/lib.rs).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use cfcli::{
    Output,
    connect::{Cluster, ConnectArgs},
    filter::{Filter, check_names, parse_peer},
};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The CortexFlow command line: status, checks, identities, flows from every node, and what decided a connection",
    after_help = "Exit codes: 0 success, 1 an error (named on stderr), 2 a usage error.\n\
The Flows API of the agents needs a bearer token of a user allowed to `get`\n\
flows.mesh.cortexflow.io (bind the ClusterRole cortexflow-flows-reader): the kubeconfig\n\
user's token, or --token / --token-file."
)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct FilterArgs {
    /// The source: NAMESPACE/POD, NAMESPACE/, id:NUMBER, id:NAMESPACE/NAME or an IPv4 address.
    #[arg(long)]
    from: Option<String>,
    /// The destination, in the same forms.
    #[arg(long)]
    to: Option<String>,
    /// Only this verdict: allowed, dropped, audit (repeatable).
    #[arg(long = "verdict")]
    verdicts: Vec<String>,
    /// Only this reason, e.g. default_deny, policy_allow (repeatable; docs/policy.md lists them).
    #[arg(long = "reason")]
    reasons: Vec<String>,
    /// Only this destination port.
    #[arg(long)]
    port: Option<u16>,
    /// Only this protocol: TCP, UDP, ICMP.
    #[arg(long)]
    protocol: Option<String>,
    /// Only flows this node reported (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Only ingress or egress verdicts.
    #[arg(long, value_parser = ["ingress", "egress"])]
    direction: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Flows from every node at once, like `hubble observe`.
    #[command(after_help = "Examples:\n  \
cfcli flows --last 20\n  \
cfcli flows --to shop/ --verdict dropped -o compact\n  \
cfcli flows --from batch/etl-7d9f --port 8080 --follow\n  \
cfcli flows --reason default_deny -o json | jq .")]
    Flows {
        #[command(flatten)]
        filter: FilterArgs,
        /// The last N matching flows of every node's history (0: all it holds).
        #[arg(long, default_value_t = 50)]
        last: usize,
        /// Keep printing new flows as they happen.
        #[arg(long, short = 'f')]
        follow: bool,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Which MeshPolicy and rule (or which default) decided the latest connection between two
    /// peers, from the rule id the kernel reported.
    #[command(after_help = "Examples:\n  \
cfcli explain shop/frontend-5d8c shop/backend-79cd-x 8080/tcp\n  \
cfcli explain batch/etl-7d9f 10.96.0.20 80/tcp -o json")]
    Explain {
        /// The source: NAMESPACE/POD, an IPv4 address, id:…
        from: String,
        /// The destination, in the same forms.
        to: String,
        /// PORT or PORT/PROTOCOL (e.g. 8080/tcp).
        port: Option<String>,
        #[arg(long, short = 'o', value_parser = ["text", "json"], default_value = "text")]
        output: String,
    },
    /// Numeric identity ↔ name ↔ SPIFFE id ↔ pods, as the operator's engine resolves them.
    #[command(after_help = "Examples:\n  cfcli identities\n  cfcli identities -n shop -o json")]
    Identities {
        /// Only this namespace's identities.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        #[arg(long, short = 'o', value_parser = ["table", "json"], default_value = "table")]
        output: String,
    },
    /// One screen: the operator replicas and leader, every node's agent, policies, identities.
    #[command(after_help = "Examples:\n  cfcli status\n  cfcli status -o json")]
    Status {
        #[command(flatten)]
        metrics: cfcli::status::MetricsArgs,
        #[arg(long, short = 'o', value_parser = ["table", "json", "yaml"], default_value = "table")]
        output: String,
    },
    /// Health checks by category (✔/✖, a hint for each failure); exits 1 when one fails.
    #[command(
        after_help = "Examples:\n  cfcli check\n  cfcli check --prometheus http://prometheus:9090 -o json"
    )]
    Check {
        #[command(flatten)]
        metrics: cfcli::status::MetricsArgs,
        #[arg(long, short = 'o', value_parser = ["text", "json"], default_value = "text")]
        output: String,
    },
    /// Installs or upgrades CortexFlow with its Helm chart (the one this cfcli was built with).
    #[command(
        after_help = "Runs `helm upgrade --install RELEASE <chart> -n <--cortexflow-namespace> --create-namespace`.\n\n\
Examples:\n  \
cfcli install --wait\n  \
cfcli install -f my-values.yaml --set image.registry=registry.example.com/cortexflow --wait\n  \
cfcli install --chart ./charts/cortexflow --release mesh"
    )]
    Install {
        #[command(flatten)]
        helm: cfcli::install::HelmArgs,
        /// A values file for the chart (repeatable; later ones win).
        #[arg(long = "values", short = 'f')]
        values: Vec<std::path::PathBuf>,
        /// One value, `key=value`, as `helm --set` (repeatable).
        #[arg(long)]
        set: Vec<String>,
        /// Install this chart directory instead of the embedded chart.
        #[arg(long)]
        chart: Option<std::path::PathBuf>,
    },
    /// Removes the Helm release; says what stays (CRDs and policies, the kernel state) and how
    /// to remove it.
    #[command(after_help = "Examples:\n  cfcli uninstall\n  cfcli uninstall --release mesh --wait")]
    Uninstall {
        #[command(flatten)]
        helm: cfcli::install::HelmArgs,
    },
    /// MeshPolicy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Prints a shell completion script, e.g. `source <(cfcli completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Before applying: the (source identity, destination identity, ports) pairs whose verdict a
    /// change of MeshPolicies would change, computed by the operator's engine on the live state.
    #[command(
        after_help = "The file's policies go to the apiserver as a dry run (nothing is stored), so\n\
what it would refuse is refused here. Needs get/list on the objects the operator\n\
watches and create/update on meshpolicies (dry run is authorized like the real write).\n\n\
Examples:\n  \
cfcli policy diff -f allow-etl.yaml\n  \
cfcli policy diff -f examples/lab/30-policies.yaml --delete\n  \
kustomize build . | cfcli policy diff -f - -o json"
    )]
    Diff {
        /// The file with one or more MeshPolicies (`-`: stdin).
        #[arg(long, short = 'f')]
        filename: std::path::PathBuf,
        /// The diff of deleting the file's policies instead of applying them.
        #[arg(long)]
        delete: bool,
        /// The namespace of policies that name none (default: the kubeconfig context's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        #[arg(long, short = 'o', value_parser = ["text", "json"], default_value = "text")]
        output: String,
    },
}

async fn filter_of(cluster: &Cluster, a: &FilterArgs) -> anyhow::Result<Filter> {
    check_names(&a.verdicts, &a.reasons)?;
    let mut from = a.from.as_deref().map(parse_peer).transpose()?;
    let mut to = a.to.as_deref().map(parse_peer).transpose()?;
    for p in [&mut from, &mut to].into_iter().flatten() {
        p.resolve(&cluster.client).await?;
    }
    Ok(Filter {
        from,
        to,
        verdicts: a.verdicts.clone(),
        reasons: a.reasons.clone(),
        port: a.port,
        protocol: a.protocol.clone(),
        nodes: a.nodes.clone(),
        direction: a.direction.clone(),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Command::Completion { shell } = args.command {
        use clap::CommandFactory as _;
        clap_complete::generate(shell, &mut Args::command(), "cfcli", &mut std::io::stdout());
        return Ok(());
    }
    let cluster = Cluster::connect(&args.connect).await?;
    match args.command {
        Command::Completion { .. } => Ok(()),
        Command::Status { metrics, output } => {
            let snap = cfcli::status::gather(&cluster, &metrics).await?;
            match output.as_str() {
                "json" => println!(
                    "{}",
                    serde_json::to_string_pretty(&cfcli::status::to_json(&snap))?
                ),
                "yaml" => print!(
                    "{}",
                    serde_saphyr::to_string(&cfcli::status::to_json(&snap))?
                ),
                _ => print!(
                    "{}",
                    cfcli::status::render(&snap, &cluster.args.trust_domain)
                ),
            }
            Ok(())
        }
        Command::Check { metrics, output } => {
            let snap = cfcli::status::gather(&cluster, &metrics).await?;
            let checks = cfcli::check::run(&snap, &cluster.args.cortexflow_namespace);
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                use std::io::IsTerminal as _;
                print!(
                    "{}",
                    cfcli::check::render(&checks, std::io::stdout().is_terminal())
                );
            }
            if checks.iter().any(|c| c.result == "fail") {
                return Err(Failed.into());
            }
            Ok(())
        }
        Command::Install {
            helm,
            values,
            set,
            chart,
        } => cfcli::install::install(&cluster, &helm, chart.as_deref(), &values, &set).await,
        Command::Uninstall { helm } => cfcli::install::uninstall(&cluster, &helm).await,
        Command::Policy {
            command:
                PolicyCommand::Diff {
                    filename,
                    delete,
                    namespace,
                    output,
                },
        } => {
            let ns = namespace.unwrap_or_else(|| cluster.client.default_namespace().to_string());
            let edits = cfcli::policy_diff::read(&cluster, &filename, &ns, delete).await?;
            let live = cfcli::live::Live::fetch(&cluster).await?;
            let d = cfcli::policy_diff::diff(&live, &edits)?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", cfcli::policy_diff::render(&d));
            }
            Ok(())
        }
        Command::Identities { namespace, output } => {
            let ids = cfcli::identities::list(&cluster, namespace.as_deref()).await?;
            print!("{}", cfcli::identities::render(&ids, output == "json"));
            Ok(())
        }
        Command::Flows {
            filter,
            last,
            follow,
            output,
        } => {
            let f = filter_of(&cluster, &filter).await?;
            cfcli::flows::run(&cluster, &f, last, follow, output).await
        }
        Command::Explain {
            from,
            to,
            port,
            output,
        } => {
            let (port, protocol) = match port
                .as_deref()
                .map(|p| p.split_once('/').unwrap_or((p, "")))
            {
                None => (None, None),
                Some((p, proto)) => (
                    Some(
                        p.parse::<u16>()
                            .map_err(|_| anyhow::anyhow!("port {p:?} is not a number"))?,
                    ),
                    (!proto.is_empty()).then(|| proto.to_string()),
                ),
            };
            let f = filter_of(
                &cluster,
                &FilterArgs {
                    from: Some(from),
                    to: Some(to),
                    verdicts: vec![],
                    reasons: vec![],
                    port,
                    protocol,
                    nodes: vec![],
                    direction: None,
                },
            )
            .await?;
            let e = cfcli::explain::explain(&cluster, &f).await?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print!("{}", cfcli::explain::render(&e));
            }
            Ok(())
        }
    }
}

/// `cfcli check` found a failure (already printed).
#[derive(Debug)]
struct Failed;

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("checks failed")
    }
}

impl std::error::Error for Failed {}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Failed>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cfcli: {e:#}");
            ExitCode::FAILURE
        }
    }
}
