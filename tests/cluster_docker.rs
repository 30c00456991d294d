//! A three-node cluster in Docker containers built from our own binary (no
//! image can be pulled here): the binary and the shared libraries `ldd` lists
//! are packed into a root file system and `docker import`ed. Each container
//! sits on two private networks the test creates: the cluster network (Raft
//! traffic, the one that is partitioned) and an admin network that stays
//! connected, through which the test reaches MQTT and the health endpoints
//! (the host routes to both bridges). The leader is cut off from the other two
//! with `docker network disconnect`: it must stop serving within an election
//! timeout, the majority elects a leader, and after the heal there is one
//! leader and no acknowledged write is lost.
//!
//! Skipped (with a message) only when `docker info` fails. Containers,
//! networks and the image are removed on drop, also when the test fails.

mod cluster;
mod docker;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use cluster::mqtt::{self, Client, Conn, Pkt, Pub};
use cluster::Endpoints;
use docker::{build_image, docker, must, Env};

const ELECTION_TIMEOUT_MAX_MS: u64 = 250;

/// Publishes QoS 1 retained messages `d/<phase>/<i>` through the leader.
async fn publish_batch(ep: &Endpoints, phase: &str, n: u32) -> Vec<String> {
    let (mut cl, _, _) = ep
        .connect_leader(&Conn::v5(&format!("pub-{phase}")), Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut topics = Vec::new();
    for i in 0..n {
        let t = format!("d/{phase}/{i}");
        cl.publish_acked(&Pub::new(&t, t.as_bytes(), 1, i as u16 + 1).retain(true), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("publish {t}: {e}"));
        topics.push(t);
    }
    cl.disconnect().await;
    topics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_stops_serving_and_nothing_acknowledged_is_lost() {
    if !docker::available() {
        return;
    }
    let mut env = Env::new();
    let t_start = Instant::now();
    build_image(&mut env);
    let image = env.image.clone().unwrap_or_default();
    let (cnet, nodes) = docker::start_three(&mut env, &image, ELECTION_TIMEOUT_MAX_MS);
    let ep = Endpoints {
        nodes: nodes
            .iter()
            .map(|&(id, _, aip)| (id, SocketAddr::new(aip, 1883), SocketAddr::new(aip, 8080)))
            .collect(),
    };
    let all = [1u64, 2, 3];
    ep.settled(&all, Duration::from_secs(20)).await;
    let l1 = ep.leader(Duration::from_secs(10)).await;
    eprintln!("image and cluster ready in {:?}; leader {l1}", t_start.elapsed());

    // A persistent subscriber, offline from now on: its queue must survive.
    let sconn = Conn::v5("dsub").persistent();
    let (mut sub, _, _) =
        ep.connect_leader(&sconn, Duration::from_secs(10)).await.unwrap_or_else(|e| panic!("{e}"));
    let (codes, _) =
        sub.subscribe(1, "d/#", 1, Duration::from_secs(5)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(codes, vec![1]);
    sub.disconnect().await;

    let mut acked = publish_batch(&ep, "before", 20).await;

    // A client of the leader keeps publishing QoS 1 retained messages while
    // the leader is cut off: whatever got a PUBACK must survive; its
    // connection must be closed (MQTT 5: DISCONNECT 0x9C first).
    let (mut minority, _, at) = ep
        .connect_leader(&Conn::v5("minority"), Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(at, l1);
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    let minority_task = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0u32.. {
            let t = format!("d/minority/{i}");
            let p = Pub::new(&t, t.as_bytes(), 1, (i % 60000) as u16 + 1).retain(true);
            // The wait is longer than the time the cut-off leader may take
            // to give up: a PUBACK is never expected late, a close is.
            if let Err(e) = minority.publish_acked(&p, Duration::from_secs(10)).await {
                return (acked, e);
            }
            acked.push(t);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        (acked, String::from("unreachable"))
    });
    // Some writes go through before the cut.
    cluster::wait_for("PUBACKs on the leader before the cut", Duration::from_secs(5), || {
        let n = count.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= 5).then_some(()) }
    })
    .await;

    // Partition the leader from the other two.
    let l1_name = env.containers[l1 as usize - 1].clone();
    let t_cmd = Instant::now();
    must(docker(&["network", "disconnect", &cnet, &l1_name]));
    let t_cut = Instant::now();
    let stopped = loop {
        match ep.health(l1).await {
            Some((200, _)) => {}
            Some((_, _)) => break t_cut.elapsed(),
            None => panic!("node {l1} does not answer /health/leader on the admin network"),
        }
        assert!(t_cut.elapsed() < Duration::from_secs(5), "partitioned leader {l1} still serves after 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "partitioned leader {l1}: /health/leader 503 {stopped:?} after `docker network disconnect` returned (the command took {:?}); election timeout max {ELECTION_TIMEOUT_MAX_MS} ms",
        t_cut - t_cmd
    );
    assert!(
        stopped <= Duration::from_millis(ELECTION_TIMEOUT_MAX_MS + 250),
        "the cut-off leader stops serving within an election timeout ({ELECTION_TIMEOUT_MAX_MS} ms, +250 ms for polling): took {stopped:?}"
    );
    let (minority_acked, why) = match tokio::time::timeout(Duration::from_secs(12), minority_task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("minority publisher task: {e}"),
        Err(_) => panic!("the cut-off leader kept its client connection open for 12 s"),
    };
    eprintln!("publisher on the cut-off leader: {} PUBACKs, then: {why}", minority_acked.len());
    assert!(
        why.contains("closed") || why.contains("Disconnect { code: 156"),
        "the cut-off leader closes its client connections (MQTT 5: DISCONNECT 0x9C): {why}"
    );
    acked.extend(minority_acked);
    // And it refuses new clients.
    match Client::connect(ep.nodes[l1 as usize - 1].1, &Conn::v5("late"), Duration::from_secs(3)).await {
        Ok((_, Pkt::ConnAck { code, .. })) => assert_ne!(code, 0, "the cut-off leader accepted a client"),
        Ok((_, other)) => panic!("expected CONNACK, got {other:?}"),
        Err(_) => {} // closed without CONNACK: refused too
    }

    // The majority elects a leader and takes writes.
    let others: Vec<u64> = all.iter().copied().filter(|&i| i != l1).collect();
    let l2 = ep.leader_among(&others, Duration::from_secs(10)).await;
    eprintln!("majority leader: {l2}");
    acked.extend(publish_batch(&ep, "during", 20).await);

    // Heal: the old leader gets its address back and rejoins.
    let l1_ip = nodes[l1 as usize - 1].1.to_string();
    must(docker(&["network", "connect", "--ip", &l1_ip, &cnet, &l1_name]));
    let st = ep.settled(&all, Duration::from_secs(20)).await;
    let serving: Vec<u64> = st.iter().filter(|s| s.serving).map(|s| s.node_id).collect();
    assert_eq!(serving.len(), 1, "one leader after the heal: {st:?}");
    eprintln!("after the heal: {st:?}");
    acked.extend(publish_batch(&ep, "after", 5).await);

    // The subscriber's session and queue: every acknowledged message.
    let (mut sub, present, _) = ep
        .connect_leader(&sconn.clone().clean(false), Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(present, "the persistent session is present after partition and heal");
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !acked.iter().all(|t| got.contains(t)) && Instant::now() < deadline {
        match sub.recv(Duration::from_secs(2)).await {
            Ok(Some(Pkt::Publish(p))) => {
                if let Some(pid) = p.pid {
                    let _ = sub.send(&mqtt::puback(pid)).await;
                }
                got.insert(p.topic);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("subscriber connection: {e}"),
        }
    }
    let missing: Vec<&String> = acked.iter().filter(|t| !got.contains(*t)).collect();
    assert!(missing.is_empty(), "acknowledged messages the persistent subscriber never got: {missing:?}");

    // Retained messages, on a fresh connection.
    let (mut fresh, _, _) = ep
        .connect_leader(&Conn::v5("fresh"), Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, early) =
        fresh.subscribe(1, "d/#", 0, Duration::from_secs(5)).await.unwrap_or_else(|e| panic!("{e}"));
    let mut retained: std::collections::BTreeSet<String> = early
        .into_iter()
        .filter_map(|p| if let Pkt::Publish(p) = p { Some(p.topic) } else { None })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !acked.iter().all(|t| retained.contains(t)) && Instant::now() < deadline {
        match fresh.recv(Duration::from_secs(2)).await {
            Ok(Some(Pkt::Publish(p))) => {
                retained.insert(p.topic);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("fresh connection: {e}"),
        }
    }
    let missing: Vec<&String> = acked.iter().filter(|t| !retained.contains(*t)).collect();
    assert!(missing.is_empty(), "acknowledged retained messages missing: {missing:?}");
    eprintln!("docker partition test done in {:?}", t_start.elapsed());
}
