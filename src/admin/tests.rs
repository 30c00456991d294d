//! Admin HTTP tests over a real loopback socket with hand-written HTTP/1.1 requests.

use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);

struct FakeView {
    status: Mutex<NodeStatus>,
}

impl FakeView {
    fn set(&self, f: impl FnOnce(&mut NodeStatus)) {
        let mut guard = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard);
    }
}

impl AdminView for FakeView {
    fn node_status(&self) -> NodeStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn render_metrics(&self, out: &mut String) {
        let status = self.node_status();
        out.push_str("# HELP raftmq_raft_term Current Raft term.\n# TYPE raftmq_raft_term gauge\n");
        out.push_str(&format!("raftmq_raft_term {}\n", status.term));
    }
}

fn leader_status() -> NodeStatus {
    NodeStatus {
        node_id: 1,
        role: Role::Leader,
        leader_id: Some(1),
        leader_mqtt_addr: Some("10.0.0.1:1883".to_owned()),
        term: 7,
        commit_index: 42,
        applied_index: 41,
        mode: Mode::FullSync,
        serving: true,
        ready: true,
    }
}

struct Running {
    addr: SocketAddr,
    view: Arc<FakeView>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), AdminError>>,
}

async fn start(token: Option<&str>) -> Running {
    let view = Arc::new(FakeView { status: Mutex::new(leader_status()) });
    let cfg = AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), token: token.map(str::to_owned) };
    let server = AdminServer::bind(&cfg, view.clone()).await.unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Running { addr, view, shutdown, task }
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> NodeStatus {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", self.body))
    }
}

/// Sends one request with `Connection: close` and reads the whole response.
async fn request(addr: SocketAddr, method: &str, path: &str, extra_headers: &[&str]) -> HttpResponse {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for h in extra_headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(DEADLINE, exchange).await.expect("HTTP exchange timed out");
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("no end of headers");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let resp = HttpResponse { status, headers, body: body.to_owned() };
    assert!(resp.header("transfer-encoding").is_none(), "fixed-length bodies expected");
    resp
}

#[tokio::test]
async fn health_endpoints_follow_the_status() {
    let running = start(None).await;
    let addr = running.addr;

    let live = request(addr, "GET", "/health/live", &[]).await;
    assert_eq!((live.status, live.body.as_str()), (200, "ok"));

    let ready = request(addr, "GET", "/health/ready", &[]).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.header("content-type"), Some("application/json"));
    assert_eq!(ready.json(), leader_status());

    let leader = request(addr, "GET", "/health/leader", &[]).await;
    assert_eq!(leader.status, 200);
    // The documented JSON field names, checked on the raw body.
    let v: serde_json::Value = serde_json::from_str(&leader.body).unwrap();
    assert_eq!(v["node_id"], 1);
    assert_eq!(v["role"], "leader");
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["leader_mqtt_addr"], "10.0.0.1:1883");
    assert_eq!(v["term"], 7);
    assert_eq!(v["commit_index"], 42);
    assert_eq!(v["applied_index"], 41);
    assert_eq!(v["mode"], "full-sync");
    assert_eq!(v["serving"], true);
    assert_eq!(v["ready"], true);

    // A leader that stopped serving: /health/leader is 503, still with the status.
    running.view.set(|s| s.serving = false);
    let leader = request(addr, "GET", "/health/leader", &[]).await;
    assert_eq!(leader.status, 503);
    assert!(!leader.json().serving);

    // A ready follower in dynsec-sync: ready 200, leader 503.
    running.view.set(|s| {
        s.role = Role::Follower;
        s.serving = true;
        s.ready = true;
        s.mode = Mode::DynsecSync;
        s.leader_id = Some(2);
    });
    assert_eq!(request(addr, "GET", "/health/ready", &[]).await.status, 200);
    let leader = request(addr, "GET", "/health/leader", &[]).await;
    assert_eq!(leader.status, 503);
    let v: serde_json::Value = serde_json::from_str(&leader.body).unwrap();
    assert_eq!(v["role"], "follower");
    assert_eq!(v["mode"], "dynsec-sync");

    running.view.set(|s| s.ready = false);
    let ready = request(addr, "GET", "/health/ready", &[]).await;
    assert_eq!(ready.status, 503);
    assert!(!ready.json().ready);

    assert_eq!(request(addr, "GET", "/nope", &[]).await.status, 404);
    assert_eq!(request(addr, "POST", "/health/live", &["Content-Length: 0"]).await.status, 405);
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let running = start(Some("secret")).await;
    let resp = request(running.addr, "GET", "/metrics", &[]).await;
    assert_eq!(resp.status, 200, "metrics stay open with a token configured");
    assert_eq!(resp.header("content-type"), Some(METRICS_CONTENT_TYPE));
    assert!(resp.body.contains("# TYPE raftmq_raft_term gauge\nraftmq_raft_term 7\n"), "{}", resp.body);
    // Health stays open too.
    assert_eq!(request(running.addr, "GET", "/health/live", &[]).await.status, 200);
}

#[tokio::test]
async fn api_requires_the_bearer_token_when_configured() {
    let running = start(Some("s3cret-token")).await;
    let addr = running.addr;
    let missing = request(addr, "GET", "/api/v1/status", &[]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let wrong = request(addr, "GET", "/api/v1/status", &["Authorization: Bearer s3cret-tokem"]).await;
    assert_eq!(wrong.status, 401);
    let not_bearer = request(addr, "GET", "/api/v1/status", &["Authorization: Basic s3cret-token"]).await;
    assert_eq!(not_bearer.status, 401);
    let prefix = request(addr, "GET", "/api/v1/status", &["Authorization: Bearer s3cret"]).await;
    assert_eq!(prefix.status, 401);

    let ok = request(addr, "GET", "/api/v1/status", &["Authorization: Bearer s3cret-token"]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json(), leader_status());
}

#[tokio::test]
async fn api_is_open_without_token_or_with_an_empty_one() {
    for token in [None, Some("")] {
        let running = start(token).await;
        let ok = request(running.addr, "GET", "/api/v1/status", &[]).await;
        assert_eq!(ok.status, 200, "token {token:?}");
        assert_eq!(ok.json().term, 7);
    }
}

#[tokio::test]
async fn bind_reports_port_in_use_and_shutdown_stops() {
    let running = start(None).await;
    let view: Arc<dyn AdminView> = running.view.clone();
    let cfg = AdminConfig { listen: running.addr, token: None };
    let err = AdminServer::bind(&cfg, view).await.unwrap_err();
    assert!(matches!(err, AdminError::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&running.addr.to_string()));

    running.shutdown.cancel();
    let result = tokio::time::timeout(DEADLINE, running.task).await.expect("server did not stop");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}

#[test]
fn admin_config_from_toml() {
    let cfg: AdminConfig = toml::from_str("listen = \"0.0.0.0:9090\"\ntoken = \"abc\"\n").unwrap();
    assert_eq!(cfg.listen, SocketAddr::from(([0, 0, 0, 0], 9090)));
    assert_eq!(cfg.token.as_deref(), Some("abc"));
    let cfg: AdminConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, AdminConfig::default());
    assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
}
