//! End-to-end runs of the scenarios against a minimal in-process MQTT peer
//! (just enough broker for the tool: CONNACK with session present for a
//! client id that connected before without clean start, SUBACK, routing by
//! exact topic or `prefix/#`, the QoS 1/2 handshakes both ways). The real runs against
//! Mosquitto and raftmq are benchmarks (tests/bench/compare.sh), not tests.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{run_async, BenchArgs, Scenario, StormPhase};
use crate::protocol::{decode, encode, ConnAck, Packet, ProtocolVersion, PubResp, Publish, QoS, SubAck};

type Routes = Arc<Mutex<Vec<(String, QoS, mpsc::Sender<Publish>)>>>;
/// Client ids whose session the peer keeps (connected without clean start).
type Sessions = Arc<Mutex<HashSet<String>>>;
/// The user name of every CONNECT, in arrival order.
type Users = Arc<Mutex<Vec<Option<String>>>>;

/// The only password the peer accepts with a user name (CONNACK 0x87 else).
const PEER_PASSWORD: &[u8] = b"pw";

fn matches(filter: &str, topic: &str) -> bool {
    match filter.strip_suffix("/#") {
        Some(prefix) => topic.starts_with(prefix) && topic[prefix.len()..].starts_with('/'),
        None => filter == topic,
    }
}

/// Starts the peer on an ephemeral port; returns the port.
async fn start_peer() -> u16 {
    start_peer_recording().await.0
}

/// [`start_peer`], also returning the user names it saw.
async fn start_peer_recording() -> (u16, Users) {
    let users: Users = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&users);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
    let port = listener.local_addr().expect("local address").port();
    let routes: Routes = Arc::new(Mutex::new(Vec::new()));
    let sessions: Sessions = Arc::new(Mutex::new(HashSet::new()));
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve(sock, Arc::clone(&routes), Arc::clone(&sessions), Arc::clone(&seen)));
        }
    });
    (port, users)
}

async fn serve(mut sock: TcpStream, routes: Routes, sessions: Sessions, users: Users) {
    let (tx, mut rx) = mpsc::channel::<Publish>(1024);
    let mut version: Option<ProtocolVersion> = None;
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut next_id: u16 = 0;
    loop {
        let mut out = BytesMut::new();
        tokio::select! {
            n = sock.read_buf(&mut rbuf) => {
                if !matches!(n, Ok(k) if k > 0) {
                    return;
                }
                loop {
                    let packet = match decode(&mut rbuf, version, 1 << 20) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(_) => return,
                    };
                    let reply = match packet {
                        Packet::Connect(c) => {
                            version = Some(c.protocol.0);
                            users.lock().expect("users lock").push(c.username.clone());
                            if c.username.is_some() && c.password.as_deref() != Some(PEER_PASSWORD) {
                                let refused = ConnAck { reason_code: 0x87, ..ConnAck::default() };
                                encode(&Packet::ConnAck(refused), c.protocol.0, &mut out).expect("encode");
                                let _ = sock.write_all(&out).await;
                                return;
                            }
                            let mut known = sessions.lock().expect("sessions lock");
                            // MQTT 5 without a session expiry ends the session with the connection.
                            let keeps = !c.clean_start
                                && (!c.protocol.0.is_v5() || c.properties.session_expiry_interval.unwrap_or(0) > 0);
                            let session_present = !c.clean_start && known.contains(&c.client_id);
                            if keeps {
                                known.insert(c.client_id);
                            } else {
                                known.remove(&c.client_id);
                            }
                            Some(Packet::ConnAck(ConnAck { session_present, ..ConnAck::default() }))
                        }
                        Packet::Subscribe(s) => {
                            let mut codes = Vec::new();
                            for (filter, opts) in s.filters {
                                codes.push(opts.qos as u8);
                                routes.lock().expect("routes lock").push((filter, opts.qos, tx.clone()));
                            }
                            Some(Packet::SubAck(SubAck { packet_id: s.packet_id, reason_codes: codes, ..SubAck::default() }))
                        }
                        Packet::Publish(p) => {
                            let targets: Vec<_> = {
                                let mut routes = routes.lock().expect("routes lock");
                                // Connections of earlier runs are gone: forget their routes.
                                routes.retain(|(_, _, s)| !s.is_closed());
                                routes
                                    .iter()
                                    .filter(|(f, _, _)| matches(f, &p.topic))
                                    .map(|(_, q, s)| (*q, s.clone()))
                                    .collect()
                            };
                            for (q, s) in targets {
                                let copy = Publish { qos: q.min(p.qos), packet_id: None, ..p.clone() };
                                // A subscriber that just left is skipped, as a broker would.
                                let _ = s.send(copy).await;
                            }
                            match (p.qos, p.packet_id) {
                                (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubResp::new(id))),
                                (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(PubResp::new(id))),
                                _ => None,
                            }
                        }
                        Packet::PubRel(r) => Some(Packet::PubComp(PubResp::new(r.packet_id))),
                        Packet::PubRec(r) => Some(Packet::PubRel(PubResp::new(r.packet_id))),
                        Packet::PingReq => Some(Packet::PingResp),
                        Packet::Disconnect(_) => return,
                        _ => None,
                    };
                    if let Some(r) = reply {
                        // After CONNECT, so a CONNACK is encoded in the client's version.
                        let v = version.unwrap_or(ProtocolVersion::V311);
                        encode(&r, v, &mut out).expect("encode reply");
                    }
                }
            }
            Some(mut p) = rx.recv() => {
                if p.qos != QoS::AtMostOnce {
                    next_id = next_id.checked_add(1).unwrap_or(1);
                    p.packet_id = Some(next_id);
                }
                encode(&Packet::Publish(p), version.unwrap_or(ProtocolVersion::V311), &mut out).expect("encode");
            }
        }
        if !out.is_empty() && sock.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn args(port: u16, scenario: Scenario) -> BenchArgs {
    BenchArgs { port, scenario, timeout: 60.0, broker_pid: Some(std::process::id()), ..BenchArgs::default() }
}

#[tokio::test]
async fn p2p_qos1_delivers_everything_and_reports_it() {
    let port = start_peer().await;
    let a =
        BenchArgs { qos: 1, clients: Some(2), msgs: Some(2000), inflight: 5, ..args(port, Scenario::P2p) };
    let r = run_async(a).await.expect("p2p run");
    assert_eq!(r.published, Some(2000));
    assert_eq!(r.received, Some(2000));
    assert_eq!(r.lost(), Some(0));
    assert!(r.msgs_per_s.is_some_and(|x| x > 0.0));
    assert!(r.p50_ms.is_some() && r.p99_ms >= r.p50_ms);
    let broker = r.broker.as_ref().expect("figures for --broker-pid");
    assert!(broker.cpu_us_per_op.is_some());
    let line = r.result_line();
    assert!(line.starts_with("RESULT scenario=p2p qos=1 clients=2 msgs=2000 "), "{line}");
}

#[tokio::test]
async fn qos2_fanin_and_v5_fanout_complete() {
    let port = start_peer().await;
    let a = BenchArgs { qos: 2, clients: Some(3), msgs: Some(300), ..args(port, Scenario::Fanin) };
    let r = run_async(a).await.expect("fanin run");
    assert_eq!((r.published, r.received), (Some(300), Some(300)));

    let a =
        BenchArgs { qos: 0, clients: Some(4), msgs: Some(250), protocol: 5, ..args(port, Scenario::Fanout) };
    let r = run_async(a).await.expect("fanout run");
    assert_eq!((r.published, r.received, r.expected), (Some(250), Some(1000), Some(1000)));
    assert!(r.broker.as_ref().is_some_and(|b| b.cpu_us_per_delivery.is_some()));
}

#[tokio::test]
async fn rate_limited_publishing_keeps_the_rate() {
    let port = start_peer().await;
    let a = BenchArgs { qos: 1, msgs: Some(200), rate: 1000, ..args(port, Scenario::P2p) };
    let started = std::time::Instant::now();
    let r = run_async(a).await.expect("rate-limited run");
    assert_eq!(r.received, Some(200));
    // 200 messages at 1000/s take about 0.2 s; flat out would take a few ms.
    assert!(started.elapsed() >= std::time::Duration::from_millis(190), "{:?}", started.elapsed());
}

#[tokio::test]
async fn connection_scenarios_count_connections() {
    let port = start_peer().await;
    let r = run_async(BenchArgs { clients: Some(200), ..args(port, Scenario::ConnRate) })
        .await
        .expect("conn-rate");
    assert_eq!((r.connected, r.failed), (Some(200), Some(0)));
    assert!(r.conn_per_s.is_some() && r.p99_ms.is_some());
    let a = BenchArgs {
        clients: Some(50),
        duration: Some(0.2),
        subscribe: true,
        ..args(port, Scenario::IdleConns)
    };
    let r = run_async(a).await.expect("idle-conns");
    assert_eq!(r.connected, Some(50));
    assert!(r.bytes_per_conn.is_some());
    assert!(r.result_line().contains(" msgs=- "));
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_not_a_hang() {
    // Bind then drop: nothing listens on this port any more.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let r = run_async(BenchArgs { msgs: Some(10), ..args(port, Scenario::P2p) }).await;
    assert!(matches!(r, Err(super::BenchError::Io { .. })), "{r:?}");
    let r = run_async(BenchArgs { clients: Some(10), ..args(port, Scenario::ConnRate) }).await;
    assert!(r.is_err());
}

#[tokio::test]
async fn persistent_p2p_reports_publish_to_puback_latency() {
    let port = start_peer().await;
    let a = BenchArgs { qos: 1, msgs: Some(500), persistent: true, protocol: 5, ..args(port, Scenario::P2p) };
    let r = run_async(a).await.expect("persistent p2p run");
    assert_eq!((r.published, r.received), (Some(500), Some(500)));
    assert!(r.ack_p50_ms.is_some() && r.ack_p99_ms >= r.ack_p50_ms);
    let line = r.result_line();
    assert!(!line.contains(" ack_p50_ms=- "), "{line}");
    // QoS 0 has no acknowledgement to time.
    let r = run_async(BenchArgs { msgs: Some(100), ..args(port, Scenario::P2p) }).await.expect("qos 0 run");
    assert!(r.ack_p50_ms.is_none());
}

#[tokio::test]
async fn reconnect_storm_finds_every_session_again() {
    for protocol in [3u8, 5] {
        let port = start_peer().await;
        let a = BenchArgs { qos: 1, clients: Some(150), protocol, ..args(port, Scenario::ReconnectStorm) };
        let r = run_async(a).await.expect("reconnect storm");
        assert_eq!(r.connected, Some(150), "protocol {protocol}");
        assert_eq!((r.sessions_present, r.sessions_missing), (Some(150), Some(0)), "protocol {protocol}");
        assert!(r.setup_s.is_some() && r.conn_per_s.is_some());
        let line = r.result_line();
        assert!(line.starts_with("RESULT scenario=reconnect-storm qos=1 clients=150 "), "{line}");
        assert!(line.contains(" sessions_present=150 sessions_missing=0 "), "{line}");
    }
}

#[tokio::test]
async fn storm_phases_split_across_runs_and_count_lost_sessions() {
    let port = start_peer().await;
    let storm =
        |phase| BenchArgs { clients: Some(80), storm_phase: phase, ..args(port, Scenario::ReconnectStorm) };
    let r = run_async(storm(StormPhase::Setup)).await.expect("setup phase");
    assert_eq!((r.connected, r.sessions_present), (Some(80), None));
    let r = run_async(storm(StormPhase::Resume)).await.expect("resume phase");
    assert_eq!((r.sessions_present, r.sessions_missing), (Some(80), Some(0)));
    // A broker that lost the sessions (here: another peer) answers session present 0.
    let other = start_peer().await;
    let r =
        run_async(BenchArgs { port: other, ..storm(StormPhase::Resume) }).await.expect("resume elsewhere");
    assert_eq!((r.connected, r.sessions_present, r.sessions_missing), (Some(80), Some(0), Some(80)));
}

#[tokio::test]
async fn credentials_and_topic_prefix_reach_the_broker() {
    let (port, users) = start_peer_recording().await;
    let creds = |password: &str| BenchArgs {
        clients: Some(5),
        username: Some("bench-{i}".into()),
        password: Some(password.into()),
        user_count: Some(3),
        ..args(port, Scenario::ConnRate)
    };
    let r = run_async(creds("pw")).await.expect("conn-rate with credentials");
    assert_eq!((r.connected, r.failed), (Some(5), Some(0)));
    let mut seen: Vec<_> =
        users.lock().expect("users lock").drain(..).map(Option::unwrap_or_default).collect();
    seen.sort();
    assert_eq!(seen, ["bench-0", "bench-0", "bench-1", "bench-1", "bench-2"]);
    // A wrong password: the refusal (and its reason code) is the run's error.
    let r = run_async(creds("wrong")).await;
    assert!(matches!(r, Err(crate::bench::BenchError::Refused { code: 0x87, .. })), "{r:?}");
    users.lock().expect("users lock").clear();
    // p2p under a topic prefix, with credentials: pairs share their user name.
    let a = BenchArgs {
        clients: Some(2),
        msgs: Some(500),
        username: Some("bench-{i}".into()),
        password: Some("pw".into()),
        topic_prefix: "bench/p2p".into(),
        ..args(port, Scenario::P2p)
    };
    let r = run_async(a).await.expect("p2p with credentials");
    assert_eq!((r.published, r.received), (Some(500), Some(500)));
    let mut seen: Vec<_> =
        users.lock().expect("users lock").drain(..).map(Option::unwrap_or_default).collect();
    seen.sort();
    assert_eq!(seen, ["bench-0", "bench-0", "bench-1", "bench-1"]);
}
