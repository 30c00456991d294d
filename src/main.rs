//! The `raftmq` command: parses the command line and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use raftmq::config::{Config, Overrides};

#[derive(Parser, Debug)]
#[command(name = "raftmq", version, about = "A highly available MQTT 3.1.1 / 5.0 broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a node. With no configuration: MQTT on 127.0.0.1:1883, admin HTTP on
    /// 127.0.0.1:8080, data in ./data.
    Serve {
        /// TOML configuration file (see config/raftmq.toml).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Address of the MQTT/TCP listener (overrides the file).
        #[arg(long, value_name = "ADDR")]
        mqtt_listen: Option<SocketAddr>,
        /// Address of the admin HTTP listener (overrides the file).
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<SocketAddr>,
        /// Data folder (overrides the file).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Load tool: drives any MQTT broker and reports throughput, latency and the
    /// broker's CPU and memory.
    Bench(raftmq::bench::BenchArgs),
    /// Client of a node's admin API: status, members, leadership.
    Ctl(raftmq::ctl::CtlArgs),
    /// Starts N real nodes on loopback (configurations under DIR) to try a
    /// cluster and failover; Ctrl-C stops them all.
    LocalCluster(raftmq::local_cluster::LocalClusterArgs),
    /// Disaster recovery: reads the data folders of STOPPED nodes offline and
    /// writes one backup (the newest state wins) to import with
    /// `raftmq ctl backup restore FILE`. The folders are not modified.
    Recover {
        /// A stopped node's data folder (repeat for several nodes).
        #[arg(long = "data-dir", value_name = "DIR", required = true)]
        data_dirs: Vec<PathBuf>,
        /// The backup file to write.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// The nodes' configuration file: its [mqtt] queue limits are used
        /// while the log is replayed (default limits otherwise).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
    /// Prints a password hash in mosquitto_passwd's `$7$` format, for password files.
    Passwd {
        /// User name of the line to print.
        username: String,
        /// Read the password from standard input instead of a prompt-less argument.
        #[arg(long)]
        password_stdin: bool,
        /// The password (prefer --password-stdin: arguments are visible to other users).
        password: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, mqtt_listen, admin_listen, data_dir } => {
            raftmq::node::init_logging();
            let overrides = Overrides { mqtt_listen, admin_listen, data_dir };
            let config = match Config::load(config.as_deref(), &overrides) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("raftmq: {e}");
                    return ExitCode::from(2);
                }
            };
            match raftmq::node::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("raftmq: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench(args) => match raftmq::bench::run(args) {
            Ok(report) => {
                println!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("raftmq bench: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl(args) => raftmq::ctl::run(args),
        Command::LocalCluster(args) => raftmq::local_cluster::run(args),
        Command::Recover { data_dirs, output, config } => recover(&data_dirs, &output, config.as_deref()),
        Command::Passwd { username, password_stdin, password } => {
            let password = match (password, password_stdin) {
                (Some(p), false) => p,
                (None, true) => {
                    let mut line = String::new();
                    if let Err(e) = std::io::stdin().read_line(&mut line) {
                        eprintln!("raftmq passwd: cannot read standard input: {e}");
                        return ExitCode::FAILURE;
                    }
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
                _ => {
                    eprintln!("raftmq passwd: give the password as an argument or with --password-stdin");
                    return ExitCode::from(2);
                }
            };
            println!(
                "{username}:{}",
                raftmq::auth::hash_password_pbkdf2(
                    password.as_bytes(),
                    raftmq::auth::passwd::DEFAULT_PBKDF2_ITERATIONS
                )
            );
            ExitCode::SUCCESS
        }
    }
}

fn recover(dirs: &[PathBuf], output: &std::path::Path, config: Option<&std::path::Path>) -> ExitCode {
    raftmq::node::init_logging();
    if output.exists() {
        eprintln!("raftmq recover: {} exists; choose another output file", output.display());
        return ExitCode::from(2);
    }
    let config = match Config::load(config, &Overrides::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("raftmq recover: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("raftmq recover: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limits = config.mqtt.state_limits();
    let effective = raftmq::backup::effective_config(&config);
    match runtime.block_on(raftmq::backup::recover::recover(dirs, output, limits, &effective)) {
        Ok(m) => {
            let count = |name: &str| m.parts.iter().find(|p| p.name == name).map(|p| p.records).unwrap_or(0);
            println!(
                "wrote {}: state at log index {} (term {}), {} sessions, {} retained messages",
                output.display(),
                m.log_index,
                m.log_term,
                count(raftmq::backup::format::PART_SESSIONS),
                count(raftmq::backup::format::PART_RETAINED),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raftmq recover: {e}");
            ExitCode::FAILURE
        }
    }
}
