use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;

use super::*;

/// `ctl` as its own command line, as main.rs nests it.
#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: CtlArgs,
}

fn member(id: u64, leader: bool, voter: bool, reachable: bool) -> MemberInfo {
    MemberInfo {
        id,
        cluster_addr: format!("127.0.0.1:{}", 22082 + id),
        mqtt_addr: format!("127.0.0.1:{}", 21882 + id),
        admin_addr: format!("127.0.0.1:{}", 21982 + id),
        voter,
        leader,
        reachable,
        role: reachable.then(|| if leader { "leader".to_string() } else { "follower".to_string() }),
        term: reachable.then_some(4),
        commit_index: reachable.then_some(120),
        applied_index: reachable.then_some(119),
        matched_index: Some(110 + id),
        lag: Some(10 - id),
        last_ack_ms: Some(12),
    }
}

fn cluster() -> ClusterInfo {
    ClusterInfo {
        answered_by: 1,
        leader_id: Some(1),
        term: 4,
        mode: Mode::FullSync,
        pinned_leader: Some(3),
        last_log_index: Some(120),
        commit_index: Some(120),
        nodes: vec![
            member(1, true, true, true),
            member(2, false, true, true),
            member(3, false, false, false),
        ],
    }
}

#[test]
fn members_table_has_aligned_columns_and_marks_the_leader() {
    let out = format_members(&cluster());
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID  ROLE         VOTE"), "{out}");
    assert!(lines[1].starts_with("1*  leader       voter    127.0.0.1:21883"), "{out}");
    assert!(lines[2].starts_with("2   follower     voter"), "{out}");
    assert!(lines[3].starts_with("3   unreachable  learner"), "{out}");
    // Every row's MQTT column starts where the header's does.
    let col = lines[0].find("MQTT").unwrap();
    for l in &lines[1..4] {
        assert_eq!(&l[col..col + 9], "127.0.0.1", "{out}");
    }
    let cells: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(cells[cells.len() - 2..], ["113", "7"], "matched and lag of node 3: {out}");
    assert!(out.contains("* leader: 1   pinned: 3   mode: full-sync"), "{out}");
}

#[test]
fn status_summarizes_node_and_cluster() {
    let status = NodeStatus {
        node_id: 2,
        role: Role::Follower,
        leader_id: Some(1),
        leader_mqtt_addr: Some("127.0.0.1:21883".into()),
        term: 4,
        commit_index: 120,
        applied_index: 119,
        mode: Mode::FullSync,
        serving: false,
        ready: false,
    };
    let out = format_status(&status, &cluster());
    assert!(out.contains("node         2 (follower)\n"), "{out}");
    assert!(out.contains("leader       1 (mqtt 127.0.0.1:21883, admin 127.0.0.1:21983)"), "{out}");
    assert!(out.contains("pinned       node 3"), "{out}");
    assert!(out.contains("members      3 (2 voters, 1 learners), 2 reachable"), "{out}");
    let mut no_leader = cluster();
    no_leader.leader_id = None;
    assert!(format_status(&status, &no_leader).contains("leader       none"));
}

#[test]
fn leader_messages() {
    let info = LeaderInfo { leader_id: Some(2), pinned_leader: Some(3) };
    assert_eq!(format_leader(&LeaderCommand::Transfer { id: 2 }, &info), "leadership moved to node 2\n");
    assert!(format_leader(&LeaderCommand::Pin { id: 3 }, &info)
        .starts_with("leadership pinned to node 3 (leader now: 2)"));
    assert_eq!(format_leader(&LeaderCommand::Unpin, &info), "leadership unpinned (leader now: 2)\n");
}

#[test]
fn command_line() {
    let cli = Cli::try_parse_from(["ctl", "--url", "http://h:1", "leader", "pin", "3", "--json"]).unwrap();
    assert_eq!(cli.args.url, "http://h:1");
    assert!(cli.args.json);
    assert!(matches!(cli.args.command, CtlCommand::Leader(LeaderCommand::Pin { id: 3 })));
    let cli = Cli::try_parse_from([
        "ctl",
        "add-node",
        "4",
        "--cluster",
        "c:1",
        "--mqtt",
        "m:1",
        "--admin",
        "a:1",
        "--learner",
    ])
    .unwrap();
    match cli.args.command {
        CtlCommand::AddNode { id, cluster, learner, .. } => {
            assert_eq!((id, cluster.as_str(), learner), (4, "c:1", true))
        }
        other => panic!("{other:?}"),
    }
    // Usage errors exit with 2.
    for bad in [
        vec!["ctl"],
        vec!["ctl", "leader", "pin"],
        vec!["ctl", "add-node", "4"],
        vec!["ctl", "remove-node", "x"],
    ] {
        let e = Cli::try_parse_from(bad.clone()).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{bad:?}");
    }
}

async fn fake_server(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

fn args(url: String, token: Option<&str>, command: CtlCommand) -> CtlArgs {
    CtlArgs { url, token: token.map(str::to_owned), json: false, command }
}

#[tokio::test]
async fn errors_say_what_is_wrong() {
    // Connection refused names the URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{closed}");
    let e = execute(&args(url.clone(), None, CtlCommand::Members)).await.unwrap_err();
    assert!(matches!(e, CtlError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&url), "{e}");

    // The real admin router with a token: 401 is reported as a token problem.
    let view: Arc<dyn crate::admin::AdminView> = Arc::new(StaticView);
    let addr = fake_server(crate::admin::router(view, Some("t0ken".into()))).await;
    let e = execute(&args(format!("http://{addr}"), Some("wrong"), CtlCommand::Members)).await.unwrap_err();
    assert!(matches!(e, CtlError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("token is missing or wrong"), "{e}");
    // With the right token the request passes; this node runs no cluster: 503 with the API's message.
    let e = execute(&args(format!("http://{addr}"), Some("t0ken"), CtlCommand::Members)).await.unwrap_err();
    match &e {
        CtlError::Api { status, message } => {
            assert_eq!(*status, 503);
            assert_eq!(message, "this node runs no cluster");
        }
        other => panic!("{other}"),
    }

    // An answer that is not the expected JSON.
    let addr =
        fake_server(Router::new().route("/api/v1/cluster", get(|| async { (StatusCode::OK, "nope") }))).await;
    let e = execute(&args(format!("http://{addr}"), None, CtlCommand::Members)).await.unwrap_err();
    assert!(matches!(e, CtlError::BadResponse { .. }), "{e}");

    assert!(matches!(
        execute(&args("https://x:1".into(), None, CtlCommand::Members)).await,
        Err(CtlError::Url(_))
    ));
}

#[tokio::test]
async fn json_output_is_the_api_answer() {
    let body = cluster();
    let served = body.clone();
    let addr =
        fake_server(Router::new().route("/api/v1/cluster", get(move || async move { Json(served) }))).await;
    let mut a = args(format!("http://{addr}"), None, CtlCommand::Members);
    a.json = true;
    let out = execute(&a).await.unwrap();
    let back: ClusterInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(back, body);
    a.json = false;
    assert_eq!(execute(&a).await.unwrap(), format_members(&body));
}

struct StaticView;

impl crate::admin::AdminView for StaticView {
    fn node_status(&self) -> NodeStatus {
        NodeStatus {
            node_id: 1,
            role: Role::Leader,
            leader_id: Some(1),
            leader_mqtt_addr: None,
            term: 1,
            commit_index: 0,
            applied_index: 0,
            mode: Mode::FullSync,
            serving: true,
            ready: true,
        }
    }
    fn render_metrics(&self, _out: &mut String) {}
}

use std::sync::Arc;
