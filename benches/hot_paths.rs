//! Criterion micro-benchmarks of the per-event and per-message hot paths:
//! `cargo bench --bench hot_paths`. Figures go to benches/RESULTS.md.

use std::hint::black_box;
use std::ops::ControlFlow;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use herald::batch::Batch;
use herald::event::{EncodedEvent, Event, write_tail};
use herald::outbox::OutFrame;
use herald::protocol::{Session, UrlId};
use herald::registry::Registry;
use herald::ws::decoder::{Decoder, encode_client_frame};
use herald::ws::frame::Opcode;
use smallvec::SmallVec;

fn appwrite_event() -> Event {
    // The shape of a document-create event: 16 channels, a handful of event names.
    let channels = [
        "documents",
        "databases.db1.collections.col1.documents",
        "databases.db1.collections.col1.documents.doc1",
        "rows",
        "databases.db1.tables.col1.rows",
        "databases.db1.tables.col1.rows.doc1",
        "tablesdb.db1.tables.col1.rows",
        "tablesdb.db1.tables.col1.rows.doc1",
        "documents.create",
        "databases.db1.collections.col1.documents.create",
        "databases.db1.collections.col1.documents.doc1.create",
        "rows.create",
        "databases.db1.tables.col1.rows.create",
        "databases.db1.tables.col1.rows.doc1.create",
        "tablesdb.db1.tables.col1.rows.create",
        "tablesdb.db1.tables.col1.rows.doc1.create",
    ];
    Event {
        id: "1795393049647-0".into(),
        project: "p".into(),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        events: vec![
            "databases.db1.collections.col1.documents.doc1.create".into(),
            "databases.*.collections.*.documents.*.create".into(),
        ],
        roles: vec!["any".into()],
        timestamp: "2026-11-23T00:17:29.647+00:00".into(),
        payload: serde_json::json!({"$id": "doc1", "name": "Chris Evans", "n": 42}),
    }
}

fn bench(c: &mut Criterion) {
    let event = appwrite_event();
    c.bench_function("encode event once (16 channels)", |b| {
        b.iter(|| EncodedEvent::encode(black_box(&event)))
    });

    let encoded = EncodedEvent::encode(&event);
    let mut registry = Registry::default();
    let guests = Arc::new(herald::identity::Identity::guest());
    let sessions: Vec<Session> = (0..10_000u32)
        .map(|k| {
            let chans = vec!["documents".to_owned(), format!("other.{k}")];
            let s = Session::new("p".into(), guests.clone(), &chans, &mut registry);
            registry.update("p", k, &[], &s.channels());
            s
        })
        .collect();
    let mut out = Vec::new();
    c.bench_function(
        "index lookup: 10,000 subscribers of one of 16 channels",
        |b| {
            b.iter(|| {
                registry.collect("p", &encoded.channels, &mut out);
                black_box(out.len())
            })
        },
    );

    c.bench_function("per subscriber: match + tail + frame", |b| {
        let s = &sessions[7];
        b.iter(|| {
            let mut tail: SmallVec<[u8; 32]> = SmallVec::new();
            // The URL subscription's id is derived per delivery, as a connection does.
            let url_id = UrlId::new(black_box(7), 7);
            write_tail(&mut tail, s.matching(black_box(&encoded), &url_id));
            black_box(OutFrame::new(Opcode::Text, encoded.prefix.clone(), tail))
        })
    });

    // The shard's fan-out: a drain of 16 events on one route, staged for 1,000 subscribers
    // (matching and tail once per subscriber, runs for the rest) and written with one vectored
    // write each into a sink. Divide by 16,000 for the cost per delivered frame.
    let mut batch = Batch::default();
    c.bench_function(
        "fan-out batch: 16 events x 1,000 subscribers, stage + writev (per batch)",
        |b| {
            b.iter(|| {
                for _ in 0..16 {
                    batch.push_event(encoded.clone());
                }
                for (k, s) in sessions.iter().take(1_000).enumerate() {
                    let k = k as u32;
                    let url_id = UrlId::new(7, k);
                    batch.stage(k, 0, |buf, ev| write_tail(buf, s.matching(ev, &url_id)));
                    for i in 1..16 {
                        batch.extend(k, i);
                    }
                }
                let touched = batch.take_touched();
                for &k in &touched {
                    let _ = black_box(batch.write(k, &mut std::io::sink()));
                }
                batch.clear(touched);
            })
        },
    );

    let frame = encode_client_frame(true, 1, br#"{"type":"ping"}"#, [1, 2, 3, 4]);
    c.bench_function("decode one small client message", |b| {
        let mut dec = Decoder::default();
        let mut buf = frame.clone();
        b.iter(|| {
            buf.copy_from_slice(&frame);
            let mut n = 0;
            let _ = dec.feed(&mut buf, 64_000, |_| {
                n += 1;
                ControlFlow::Continue(())
            });
            black_box(n)
        })
    });
}

/// `subscribe` rows `first..first + rows`, each of 100 distinct short channels; row `s` is
/// subscription `s % 10` (so that any number of rows stays within 1,000 distinct channels).
fn subscribe_rows(first: usize, rows: usize) -> String {
    let rows: Vec<serde_json::Value> = (first..first + rows)
        .map(|s| {
            let s = s % 10;
            let channels: Vec<String> = (0..100).map(|c| format!("{s}.{c}")).collect();
            serde_json::json!({"subscriptionId": format!("s{s}"), "channels": channels})
        })
        .collect();
    serde_json::json!({"type": "subscribe", "data": rows}).to_string()
}

/// The most work one client message can cost a shard under the default limits: a no-op upsert
/// of as many rows as fit in 64,000 bytes, on a session already at the 1,000 distinct channels
/// a connection may hold, with what `Connection` does around it (channel sets before and
/// after, the index).
fn bench_largest_subscribe(c: &mut Criterion) {
    let limits = herald::protocol::SessionLimits::default();
    let mut registry = Registry::default();
    let mut session = Session::new(
        Arc::from("p"),
        Arc::new(herald::identity::Identity::guest()),
        &[],
        &mut registry,
    );
    let jwt = herald::identity::JwtVerifier::none();
    let jwt = herald::protocol::Verifiers {
        jwt: &jwt,
        sessions: false,
    };
    let before = session.channels();
    let url_id = herald::protocol::UrlId::new(1, 1);
    let reply = session.handle_text(&subscribe_rows(0, 10), &limits, jwt, &mut registry, &url_id);
    assert!(reply.subscriptions_changed);
    registry.update("p", 7, &before, &session.channels());
    assert_eq!(session.channels().len(), limits.max_total_channels);
    let rows = (1..=100)
        .take_while(|&n| subscribe_rows(0, n).len() <= 64_000)
        .last()
        .unwrap_or(1);
    let upsert = subscribe_rows(0, rows);
    c.bench_function(
        &format!(
            "largest subscribe: no-op upsert of {rows} rows x 100 channels ({} bytes) over 1,000 channels",
            upsert.len()
        ),
        |b| {
            b.iter(|| {
                let before = session.channels();
                let reply = session.handle_text(&upsert, &limits, jwt, &mut registry, &url_id);
                if reply.subscriptions_changed {
                    registry.update("p", 7, &before, &session.channels());
                }
                black_box(reply.frame)
            })
        },
    );
}

criterion_group!(benches, bench, bench_largest_subscribe);
criterion_main!(benches);
