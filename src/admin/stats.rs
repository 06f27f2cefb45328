//! `GET /v1/stats`: the metrics of `/metrics` as JSON, for the dashboard page.
//!
//! Owns the translation from Prometheus' families to JSON and nothing else: it reads the same
//! registry as `/metrics`, so the page and a Prometheus server never disagree. Rates are left
//! to the reader (two samples and their `time_ms`).

use prometheus::proto::{MetricFamily, MetricType};
use serde_json::{Map, Value, json};

/// Every family as `name -> {"type", "help", "series": [{"labels", ...value}]}`.
pub fn families_json(families: &[MetricFamily]) -> Value {
    let mut out = Map::new();
    for family in families {
        let kind = family.get_field_type();
        let series: Vec<Value> = family
            .get_metric()
            .iter()
            .map(|m| {
                let labels: Map<String, Value> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), Value::from(l.value())))
                    .collect();
                let mut one = json!({ "labels": labels });
                match kind {
                    MetricType::COUNTER => one["value"] = json!(m.get_counter().value()),
                    MetricType::GAUGE => one["value"] = json!(m.get_gauge().value()),
                    MetricType::HISTOGRAM => {
                        let h = m.get_histogram();
                        one["count"] = json!(h.get_sample_count());
                        one["sum"] = json!(h.get_sample_sum());
                        // [upper bound, cumulative count]; +Inf is `count`.
                        let buckets: Vec<Value> = h
                            .get_bucket()
                            .iter()
                            .map(|b| json!([b.upper_bound(), b.cumulative_count()]))
                            .collect();
                        one["buckets"] = Value::from(buckets);
                    }
                    _ => {}
                }
                one
            })
            .collect();
        let kind = match kind {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            _ => "other",
        };
        out.insert(
            family.name().to_owned(),
            json!({ "type": kind, "help": family.help(), "series": series }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn counters_gauges_and_histograms_keep_their_labels_and_values() {
        let m = Metrics::new();
        m.connections.with_label_values(&["0"]).set(3);
        m.connections.with_label_values(&["1"]).set(4);
        m.events_published.inc_by(7);
        m.fanout_latency.with_label_values(&["0"]).observe(0.003);
        let v = families_json(&m.registry.gather());
        let conns = &v["herald_connections"];
        assert_eq!(conns["type"], "gauge");
        let mut by_shard: Vec<(String, f64)> = conns["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["labels"]["shard"].as_str().unwrap().to_owned(),
                    s["value"].as_f64().unwrap(),
                )
            })
            .collect();
        by_shard.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(by_shard, [("0".into(), 3.0), ("1".into(), 4.0)]);
        assert_eq!(
            v["herald_events_published_total"]["series"][0]["value"],
            7.0
        );
        let h = &v["herald_fanout_latency_seconds"]["series"][0];
        assert_eq!(h["count"], 1);
        let first_holding = h["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b[1] == 1)
            .unwrap();
        assert_eq!(first_holding[0], 0.005, "0.003 s falls in the 5 ms bucket");
    }
}
