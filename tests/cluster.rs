//! Redis Cluster as the bus: S stream shards over a local 3-master cluster. Each project's events
//! are in the one stream its name hashes to (`herald::bus::streams`), every node reads all S of
//! them, and an event's id names its shard (`k:<ms>-<seq>` past shard 0), so that a resume works
//! on any node. Every test picks one project on each shard and runs its own cluster
//! (redis-server and redis-cli, installed by ./scripts/test).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use herald::bus::streams::StreamShards;
use serde_json::json;

const STREAM: &str = "herald:events";
const SHARDS: u16 = 3;

/// The stream shards, as every node computes them.
fn shards() -> StreamShards {
    StreamShards::new(STREAM, SHARDS)
}

/// A project, the stream shard that holds its events and that shard's key.
struct Project {
    name: String,
    shard: u16,
    key: String,
}

/// One project on each stream shard: `projects()[k]` is on shard k.
fn projects() -> Vec<Project> {
    let shards = shards();
    let mut found: Vec<Option<String>> = vec![None; usize::from(SHARDS)];
    for n in 0..10_000 {
        let name = format!("p{n}");
        let k = usize::from(shards.shard_of(&name));
        if found[k].is_none() {
            found[k] = Some(name);
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found
        .into_iter()
        .zip(0u16..)
        .map(|(name, shard)| Project {
            name: name.unwrap_or_else(|| panic!("none of p0..p9999 is on shard {shard}")),
            shard,
            key: shards.key(shard).expect("a key for every shard").to_owned(),
        })
        .collect()
}

impl Project {
    /// The id a client sees for the entry `stream_id` of this project's stream.
    fn event_id(&self, stream_id: &str) -> String {
        match self.shard {
            0 => stream_id.to_owned(),
            k => format!("{k}:{stream_id}"),
        }
    }

    fn url(&self, server: &Server, extra_query: &str) -> String {
        server.url(&format!(
            "/v1/realtime?project={}&channels[]=c{extra_query}",
            self.name
        ))
    }

    /// XADDs event `n` straight to the project's stream key; returns its event id.
    fn xadd(&self, cluster: &RedisCluster, n: usize) -> String {
        let payload = json!({"n": n}).to_string();
        let id = cluster.xadd(
            &self.key,
            &[
                ("project", self.name.as_str()),
                ("channels", r#"["c"]"#),
                ("payload", payload.as_str()),
            ],
        );
        self.event_id(&id)
    }

    /// The same with plain `redis-cli -c` against the first node (which follows the MOVED
    /// redirect to the key's master), as any backend in any language would publish.
    fn redis_cli_xadd(&self, cluster: &RedisCluster, n: usize) -> String {
        let port = cluster.ports()[0].to_string();
        let payload = json!({"n": n}).to_string();
        let out = Command::new("redis-cli")
            .args(["-c", "-p", port.as_str(), "XADD", self.key.as_str(), "*"])
            .args(["project", self.name.as_str(), "channels", r#"["c"]"#])
            .args(["payload", payload.as_str()])
            .output()
            .expect("redis-cli");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "redis-cli XADD: {stdout}");
        let id = stdout.lines().map(str::trim).rfind(|l| !l.is_empty());
        self.event_id(id.unwrap_or_else(|| panic!("redis-cli XADD printed no id: {stdout:?}")))
    }

    /// Publishes event `n` through `server`'s publish API; returns its id, checking its form.
    fn publish(&self, server: &Server, n: usize) -> String {
        let id =
            server.publish(json!({"project": self.name, "channels": ["c"], "payload": {"n": n}}));
        assert_shard_form(&id, self.shard);
        id
    }
}

/// An event of shard 0 has the stream id `<ms>-<seq>` as its id; one of shard k > 0 has
/// `k:<ms>-<seq>`.
fn assert_shard_form(id: &str, shard: u16) {
    let stream_id = match shard {
        0 => id,
        k => id
            .strip_prefix(&format!("{k}:"))
            .unwrap_or_else(|| panic!("{id}: an event of shard {k} has an id starting \"{k}:\"")),
    };
    let parts = stream_id.split_once('-');
    assert!(
        parts.is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok()),
        "{id}: not <ms>-<seq> after the shard (shard {shard})"
    );
}

fn node(cluster: &RedisCluster, extra: &[&str]) -> Server {
    let addresses = cluster.addresses();
    let shards = SHARDS.to_string();
    let mut args = vec![
        "--shards",
        "2",
        "--redis-cluster",
        addresses.as_str(),
        "--stream-shards",
        shards.as_str(),
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    wait_ready(&server, true);
    server
}

async fn expect_error(ws: &mut Ws, code: u16) {
    let err = next_json(ws).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["data"]["code"], code, "{err}");
}

/// POSTs `body` to /v1/events and waits at most `timeout` for the answer.
fn publish_within(server: &Server, body: &str, timeout: Duration) -> (u16, String) {
    let mut resp = ureq::post(&format!("http://{}/v1/events", server.admin))
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .header("content-type", "application/json")
        .send(body)
        .unwrap_or_else(|e| panic!("no answer to a publish within {timeout:?}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_deliver_every_event_exactly_once_in_stream_order_on_every_shard() {
    raise_fd_limit();
    let cluster = RedisCluster::start();
    let a = node(&cluster, &[]);
    let b = node(&cluster, &[]);
    let projects = projects();
    let mut groups = Vec::new();
    for p in &projects {
        let mut all = clients(&p.url(&a, ""), 100).await;
        all.extend(clients(&p.url(&b, ""), 100).await);
        groups.push(all);
    }

    // The three shards in turn, each event published one of four ways.
    let mut published: Vec<Vec<String>> = vec![Vec::new(); projects.len()];
    for n in 0..30 {
        for (i, p) in projects.iter().enumerate() {
            let id = match (n + i) % 4 {
                0 => p.redis_cli_xadd(&cluster, n),
                1 => p.xadd(&cluster, n),
                2 => p.publish(&a, n),
                _ => p.publish(&b, n),
            };
            assert_shard_form(&id, p.shard);
            published[i].push(id);
        }
    }
    let receivers = groups
        .into_iter()
        .zip(&published)
        .map(|(clients, ids)| assert_all_receive(clients, ids));
    futures_util::future::join_all(receivers).await;

    // One shard per master: each node holds exactly one of the three streams.
    let shards = shards();
    for port in cluster.ports() {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("client")
            .get_connection()
            .expect("connect to a cluster node");
        // A node that does not serve a key's slot answers MOVED: an error, not a 1.
        let held: Vec<&String> = shards
            .keys()
            .iter()
            .filter(|key| {
                redis::cmd("EXISTS")
                    .arg(key.as_str())
                    .query::<i64>(&mut conn)
                    .is_ok_and(|n| n == 1)
            })
            .collect();
        assert_eq!(held.len(), 1, "node {port} holds {held:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_on_every_shard_are_skipped_and_counted() {
    let cluster = RedisCluster::start();
    let a = node(&cluster, &[]);
    let projects = projects();
    let mut conns = Vec::new();
    for p in &projects {
        conns.push(connect(&p.url(&a, "")).await.0);
    }
    let mut around = Vec::new();
    for p in &projects {
        let before = p.xadd(&cluster, 0);
        let project = ("project", p.name.as_str());
        cluster.xadd(&p.key, &[project, ("payload", "{}")]);
        cluster.xadd(
            &p.key,
            &[project, ("channels", r#"["c"]"#), ("payload", "not json")],
        );
        cluster.xadd(&p.key, &[project, ("channels", "c"), ("payload", "{}")]);
        let after = p.xadd(&cluster, 1);
        around.push([before, after]);
    }
    for (ws, ids) in conns.iter_mut().zip(&around) {
        for (n, id) in ids.iter().enumerate() {
            let ev = next_json(ws).await;
            assert_eq!(ev["data"]["id"], id.as_str(), "{ev}");
            assert_eq!(ev["data"]["payload"], json!({"n": n}), "{ev}");
        }
    }
    // Each good entry is read after the bad ones before it in its stream: all 9 are counted.
    assert_eq!(a.metric("herald_stream_entries_skipped_total"), 9.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_restarted_loses_nothing_and_nodes_come_back_by_themselves() {
    let mut cluster = RedisCluster::start();
    let a = node(&cluster, &[]);
    let projects = projects();
    let mut conns = Vec::new();
    for p in &projects {
        conns.push(connect(&p.url(&a, "")).await.0);
    }
    let mut published: Vec<Vec<String>> = projects
        .iter()
        .map(|p| (0..5).map(|n| p.xadd(&cluster, n)).collect())
        .collect();
    for (ws, ids) in conns.iter_mut().zip(&published) {
        expect_events(ws, ids).await;
    }

    cluster.kill_all();
    wait_ready(&a, false);
    // While the cluster is away, publishing through herald says so instead of losing the event.
    let body = json!({"project": projects[1].name, "channels": ["c"], "payload": {}});
    let (status, reply) = publish_within(&a, &body.to_string(), Duration::from_secs(30));
    assert_eq!(status, 503, "{reply}");

    cluster.restart_all();
    // Perhaps XADDed before the node has reconnected: read back from where it left off.
    for (p, ids) in projects.iter().zip(&mut published) {
        ids.extend((5..10).map(|n| p.xadd(&cluster, n)));
    }
    wait_ready(&a, true);
    for (p, ids) in projects.iter().zip(&mut published) {
        ids.extend((10..15).map(|n| p.xadd(&cluster, n)));
        ids.push(p.publish(&a, 15));
    }
    // The same connections, never closed, get every event after the restart once, in order.
    for (ws, ids) in conns.iter_mut().zip(&published) {
        expect_events(ws, &ids[5..]).await;
    }
    let last: Vec<String> = projects.iter().map(|p| p.xadd(&cluster, 16)).collect();
    for (ws, id) in conns.iter_mut().zip(last) {
        expect_events(ws, &[id]).await;
        let extra = next_json_within(ws, Duration::from_millis(300)).await;
        assert!(extra.is_none(), "unexpected extra message: {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_node_clients_resume_on_the_other_node_with_every_event_exactly_once() {
    const CLIENTS_PER_PROJECT: usize = 34;
    const ROUNDS: usize = 50;
    let cluster = RedisCluster::start();
    let mut a = node(&cluster, &[]);
    let b = node(&cluster, &[]);
    let projects = projects();

    // Each client reads until it has ROUNDS events; when its node dies it reconnects to the
    // other node with the last id it saw (the start of its shard if it saw none).
    let mut tasks = Vec::new();
    for (i, p) in projects.iter().enumerate() {
        let url_b = p.url(&b, "");
        let start = p.event_id("0-0");
        for ws in clients(&p.url(&a, ""), CLIENTS_PER_PROJECT).await {
            let url_b = url_b.clone();
            let start = start.clone();
            let task = tokio::spawn(follow(ws, url_b, start, ROUNDS));
            tasks.push((i, task));
        }
    }

    let mut published: Vec<Vec<String>> = vec![Vec::new(); projects.len()];
    for n in 0..ROUNDS {
        if n == ROUNDS / 3 {
            a.kill9();
        }
        for (p, ids) in projects.iter().zip(&mut published) {
            ids.push(p.xadd(&cluster, n));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, t) in tasks {
        let (got, reconnects) = t.await.unwrap();
        assert!(reconnects >= 1, "the client never lost its node");
        assert_eq!(
            got, published[i],
            "every event of {} (shard {}) exactly once, in stream order",
            projects[i].name, projects[i].shard
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_the_projects_shard_and_its_edge_cases() {
    let cluster = RedisCluster::start();
    // Memory history of 5 events: older resumes must come from the stream itself (XRANGE).
    let a = node(&cluster, &["--history-events", "5"]);
    let projects = projects();
    let mut live = Vec::new();
    for p in &projects {
        live.push(connect(&p.url(&a, "")).await.0);
    }
    // 20 events per project, one project after the other: the last 5 events of all are the
    // last project's.
    let ids: Vec<Vec<String>> = projects
        .iter()
        .map(|p| (0..20).map(|n| p.xadd(&cluster, n)).collect())
        .collect();
    for (ws, ids) in live.iter_mut().zip(&ids) {
        expect_events(ws, ids).await;
    }

    // (project index, client) for every client that must get the next live event.
    let mut waiting: Vec<(usize, Ws)> = live.into_iter().enumerate().collect();
    for (i, p) in projects.iter().enumerate() {
        // Past the memory history: served from the project's stream with XRANGE.
        let url = p.url(&a, &format!("&lastEventId={}", ids[i][12]));
        let (mut far, _) = connect(&url).await;
        expect_events(&mut far, &ids[i][13..]).await;
        // The last two: from memory (for the last project at least, whatever the history's
        // layout), otherwise from the stream.
        let url = p.url(&a, &format!("&lastEventId={}", ids[i][17]));
        let (mut near, _) = connect(&url).await;
        expect_events(&mut near, &ids[i][18..]).await;
        waiting.push((i, far));
        waiting.push((i, near));
    }

    // A shard past --stream-shards: resync.
    let (mut past, _) = connect(&projects[0].url(&a, "&lastEventId=7:1-0")).await;
    expect_error(&mut past, 4010).await;
    waiting.push((0, past));
    // An id of another shard than the project's (the shard-0 form among them): resync.
    for (i, p) in projects.iter().enumerate() {
        let other = &ids[(i + 1) % projects.len()][12];
        let (mut ws, _) = connect(&p.url(&a, &format!("&lastEventId={other}"))).await;
        expect_error(&mut ws, 4010).await;
        waiting.push((i, ws));
    }
    // Not an event id at all.
    let (mut bad, _) = connect(&projects[1].url(&a, "&lastEventId=abc")).await;
    expect_error(&mut bad, 4011).await;
    waiting.push((1, bad));

    // Every one of them stays connected and gets what comes next, live.
    let last: Vec<String> = projects.iter().map(|p| p.xadd(&cluster, 1000)).collect();
    for (i, ws) in &mut waiting {
        expect_events(ws, std::slice::from_ref(&last[*i])).await;
    }
}
