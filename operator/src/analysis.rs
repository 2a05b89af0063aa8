//! Analysis checks: preset and custom PromQL, rendered with the rollout's labels, evaluated
//! against thresholds. An empty result, NaN, or an unreachable Prometheus is *inconclusive*,
//! never a pass (Flagger #1090, Argo #1466); P95 is a real `histogram_quantile`, not a mean.

use std::time::Duration;

use crate::crd::{
    AnalysisSpec, CheckResult, Color, MetricSpec, Preset, WeightCheck, WeightCheckResult,
};

/// The values substituted into queries.
#[derive(Clone, Debug)]
pub struct Vars {
    pub namespace: String,
    pub rollout: String,
    pub canary_color: Color,
    pub stable_color: Color,
    pub canary_revision: String,
    pub stable_revision: String,
    pub interval: Duration,
    /// The evidence window: since the step began, at least one interval.
    pub window: Duration,
}

impl Vars {
    fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "namespace" => self.namespace.clone(),
            "rollout" => self.rollout.clone(),
            "canaryColor" => self.canary_color.to_string(),
            "stableColor" => self.stable_color.to_string(),
            "canaryRevision" => self.canary_revision.clone(),
            "stableRevision" => self.stable_revision.clone(),
            "interval" => prom_duration(self.interval),
            "window" => prom_duration(self.window),
            // The stable baseline for comparisons: long enough to still hold data when the
            // canary takes 100% and stable gets nothing, however long the step is held (a
            // bake at 100%): the step's window and 10 intervals before it.
            "baselineWindow" => prom_duration(
                self.window
                    .saturating_add(self.interval.saturating_mul(10))
                    .max(Duration::from_secs(60)),
            ),
            _ => return None,
        })
    }
}

/// A Prometheus range selector duration (`1500ms`, `30s`).
pub fn prom_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Replaces `{{name}}` placeholders; an unknown one is an error naming it.
pub fn render(template: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "unclosed {{ in query".to_owned())?;
        let key = after[..end].trim();
        out.push_str(
            &vars
                .get(key)
                .ok_or_else(|| format!("unknown placeholder {{{{{key}}}}}"))?,
        );
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn selector(side: Side) -> &'static str {
    match side {
        Side::Canary => {
            r#"namespace="{{namespace}}",rollout="{{rollout}}",color="{{canaryColor}}",revision="{{canaryRevision}}""#
        }
        Side::Stable => {
            r#"namespace="{{namespace}}",rollout="{{rollout}}",color="{{stableColor}}",revision="{{stableRevision}}""#
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Canary,
    Stable,
}

pub fn p95_query(side: Side) -> String {
    let window = if side == Side::Canary {
        "{{window}}"
    } else {
        "{{baselineWindow}}"
    };
    format!(
        "histogram_quantile(0.95, sum by (le) (rate(embedder_request_duration_seconds_bucket{{{}}}[{window}])))",
        selector(side)
    )
}

pub fn error_rate_query() -> String {
    let sel = selector(Side::Canary);
    // `or vector(0)`: no 5xx series at all means zero errors, not "no data".
    format!(
        "(sum(rate(embedder_requests_total{{{sel},code=~\"5..\"}}[{{{{window}}}}])) or vector(0)) \
         / sum(rate(embedder_requests_total{{{sel}}}[{{{{window}}}}]))"
    )
}

pub fn requests_query(side: Side) -> String {
    format!(
        "sum(increase(embedder_requests_total{{{}}}[{{{{window}}}}]))",
        selector(side)
    )
}

/// Whether Prometheus scrapes the canary's pods at all: `up` exists for every target.
pub fn scraped_query() -> String {
    format!("count(up{{{}}})", selector(Side::Canary))
}

/// Runs PromQL instant queries. The real one is `prometheus::Prometheus`; tests use a map.
pub trait Querier {
    /// The samples of the result (a scalar is one sample); empty when there is no data.
    fn query(
        &self,
        promql: &str,
    ) -> impl std::future::Future<Output = Result<Vec<f64>, String>> + Send;
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetricOutcome {
    pub name: String,
    pub value: Option<f64>,
    pub display: Option<String>,
    pub threshold: String,
    pub result: CheckResult,
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AnalysisOutcome {
    pub result: CheckResult,
    pub metrics: Vec<MetricOutcome>,
    /// Canary P95 (seconds) and error rate, when a preset measured them.
    pub latency_p95: Option<f64>,
    pub error_rate: Option<f64>,
    pub weight_check: Option<WeightCheck>,
    /// One line for status.message, conditions and Events.
    pub summary: String,
}

enum Threshold {
    Max(f64),
    Min(f64),
}

fn parse_number(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a number"))
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    crate::crd::parse_duration(text).map(|d| d.as_secs_f64())
}

fn format_value(preset: Option<Preset>, value: f64) -> String {
    match preset {
        Some(Preset::LatencyP95 | Preset::LatencyP95VsStable) => format!("{:.1}ms", value * 1000.0),
        Some(Preset::ErrorRate) => format!("{:.2}%", value * 100.0),
        None => format!("{value:.4}"),
    }
}

/// One metric against its threshold; `value` is `Err(reason)` when there was nothing to judge.
fn judge(metric: &MetricSpec, value: Result<f64, String>) -> MetricOutcome {
    let latency = matches!(
        metric.preset,
        Some(Preset::LatencyP95 | Preset::LatencyP95VsStable)
    );
    let parse = |t: &str| {
        if latency {
            parse_seconds(t)
        } else {
            parse_number(t)
        }
    };
    // `maxIncrease` alone (the CRD refuses it beside `max`/`min`); otherwise `min`, `max` or
    // both, which the value must lie between.
    type Bound = fn(f64) -> Threshold;
    let named: Vec<(Bound, &String, String)> = match &metric.max_increase {
        Some(t) => vec![(Threshold::Max, t, format!("<= +{t}"))],
        None => [
            (metric.min.as_ref(), Threshold::Min as Bound, ">="),
            (metric.max.as_ref(), Threshold::Max as Bound, "<="),
        ]
        .into_iter()
        .filter_map(|(t, bound, op)| t.map(|t| (bound, t, format!("{op} {t}"))))
        .collect(),
    };
    let bounds = if named.is_empty() {
        Err("no threshold".to_owned())
    } else {
        named
            .into_iter()
            .map(|(bound, t, text)| parse(t).map(|limit| (bound(limit), text)))
            .collect::<Result<Vec<_>, _>>()
    };
    let mut outcome = MetricOutcome {
        name: metric.name.clone(),
        value: None,
        display: None,
        threshold: String::new(),
        result: CheckResult::Inconclusive,
        message: None,
    };
    let bounds = match bounds {
        Ok(bounds) => bounds,
        Err(e) => {
            outcome.message = Some(format!("bad threshold: {e}"));
            return outcome;
        }
    };
    let threshold_text = bounds
        .iter()
        .map(|(_, text)| text.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    outcome.threshold = threshold_text;
    let value = match value {
        Ok(v) if v.is_finite() => v,
        Ok(_) => {
            outcome.message = Some("no data (NaN)".to_owned());
            return outcome;
        }
        Err(reason) => {
            outcome.message = Some(reason);
            return outcome;
        }
    };
    outcome.value = Some(value);
    let display = format_value(metric.preset, value);
    let breached = bounds.iter().find_map(|(bound, _)| match *bound {
        Threshold::Max(limit) if value > limit => Some(limit),
        Threshold::Min(limit) if value < limit => Some(limit),
        _ => None,
    });
    let passed = breached.is_none();
    let limit = breached.unwrap_or_default();
    outcome.result = if passed {
        CheckResult::Passed
    } else {
        CheckResult::Failed
    };
    if !passed {
        outcome.message = Some(format!(
            "{} = {display}, limit {} ({})",
            metric.name,
            format_value(metric.preset, limit),
            outcome.threshold
        ));
    }
    outcome.display = Some(display);
    outcome
}

async fn single<Q: Querier>(querier: &Q, promql: &str) -> Result<f64, String> {
    let samples = querier
        .query(promql)
        .await
        .map_err(|e| format!("Prometheus: {e}"))?;
    match samples.as_slice() {
        [] => Err("no data".to_owned()),
        [value] => Ok(*value),
        many => Err(format!(
            "the query returned {} series; it must return one",
            many.len()
        )),
    }
}

/// The canary's observed share of requests against `weight`. The tolerance is the larger of
/// `tolerance_percent` and four binomial standard deviations for the requests seen, so a
/// small sample never raises a false alarm.
pub fn weight_check(weight: i32, canary: f64, stable: f64, tolerance_percent: i32) -> WeightCheck {
    let total = canary + stable;
    let requests = total.round() as i64;
    let p = f64::from(weight) / 100.0;
    // Below ~10 expected requests on either side the share says nothing.
    if total * p.min(1.0 - p).max(0.01) < 10.0 {
        return WeightCheck {
            weight,
            observed_percent: None,
            requests,
            result: WeightCheckResult::InsufficientTraffic,
        };
    }
    let observed = canary / total;
    let sigma = (p * (1.0 - p) / total).sqrt();
    let allowed = (f64::from(tolerance_percent) / 100.0).max(4.0 * sigma);
    let result = if (observed - p).abs() <= allowed {
        WeightCheckResult::Matched
    } else {
        WeightCheckResult::Mismatched
    };
    WeightCheck {
        weight,
        observed_percent: Some(format!("{:.1}", observed * 100.0)),
        requests,
        result,
    }
}

/// One analysis run at `weight`.
pub async fn run<Q: Querier>(
    querier: &Q,
    spec: &AnalysisSpec,
    vars: &Vars,
    weight: i32,
) -> AnalysisOutcome {
    let render_q = |q: &str| render(q, vars);
    let canary_requests = single(
        querier,
        &render_q(&requests_query(Side::Canary)).expect("preset renders"),
    )
    .await;
    let stable_requests = single(
        querier,
        &render_q(&requests_query(Side::Stable)).expect("preset renders"),
    )
    .await;
    // No series at all means no requests, which is a count of zero.
    let count = |r: &Result<f64, String>| match r {
        Ok(v) => Ok(*v),
        Err(e) if e == "no data" => Ok(0.0),
        Err(e) => Err(e.clone()),
    };
    let canary_count = count(&canary_requests);
    let weight_check = match (&canary_count, count(&stable_requests)) {
        (Ok(c), Ok(s)) => Some(weight_check(weight, *c, s, spec.weight_tolerance_percent)),
        _ => None,
    };
    // "No requests" and "not scraped" look alike (no series); only the second needs a person.
    let unscraped = if matches!(&canary_requests, Err(e) if e == "no data") {
        match single(
            querier,
            &render_q(&scraped_query()).expect("preset renders"),
        )
        .await
        {
            Err(e) if e == "no data" => Some(format!(
                "Prometheus has no series for the canary's pods (namespace={}, rollout={}, color={}, revision={}): \
                 check that the embedder container declares its port (containerPort), that a PodMonitor or scrape job \
                 selects the pods, and that it maps their embedroll.dev/rollout, color and revision labels",
                vars.namespace, vars.rollout, vars.canary_color, vars.canary_revision
            )),
            _ => None,
        }
    } else {
        None
    };
    let starved = match &canary_count {
        _ if unscraped.is_some() => unscraped,
        Ok(n) if *n < spec.min_requests as f64 => Some(format!(
            "{} canary requests since the step began ({}), fewer than minRequests {}",
            n.round(),
            prom_duration(vars.window),
            spec.min_requests
        )),
        Ok(_) => None,
        Err(e) => Some(e.clone()),
    };

    let mut metrics = Vec::with_capacity(spec.metrics.len());
    let (mut latency_p95, mut error_rate) = (None, None);
    for metric in &spec.metrics {
        let value: Result<f64, String> = if let Some(reason) = &starved {
            Err(reason.clone())
        } else {
            match (metric.preset, &metric.query) {
                (Some(Preset::LatencyP95), _) => {
                    single(querier, &render_q(&p95_query(Side::Canary)).unwrap()).await
                }
                (Some(Preset::ErrorRate), _) => {
                    single(querier, &render_q(&error_rate_query()).unwrap()).await
                }
                (Some(Preset::LatencyP95VsStable), _) => {
                    let canary =
                        single(querier, &render_q(&p95_query(Side::Canary)).unwrap()).await;
                    let stable =
                        single(querier, &render_q(&p95_query(Side::Stable)).unwrap()).await;
                    if let Ok(c) = canary {
                        latency_p95 = latency_p95.or(Some(c));
                    }
                    match (canary, stable) {
                        (Ok(c), Ok(s)) => Ok(c - s),
                        (Err(e), _) => Err(format!("canary: {e}")),
                        (_, Err(e)) => Err(format!("stable baseline: {e}")),
                    }
                }
                (None, Some(query)) => match render_q(query) {
                    Ok(q) => single(querier, &q).await,
                    Err(e) => Err(e),
                },
                (None, None) => Err("neither preset nor query".to_owned()),
            }
        };
        let outcome = judge(metric, value);
        match metric.preset {
            Some(Preset::LatencyP95) => latency_p95 = outcome.value.or(latency_p95),
            Some(Preset::ErrorRate) => error_rate = outcome.value,
            _ => {}
        }
        metrics.push(outcome);
    }

    let failed: Vec<&MetricOutcome> = metrics
        .iter()
        .filter(|m| m.result == CheckResult::Failed)
        .collect();
    let inconclusive: Vec<&MetricOutcome> = metrics
        .iter()
        .filter(|m| m.result == CheckResult::Inconclusive)
        .collect();
    let (result, summary) = if !failed.is_empty() {
        let what: Vec<String> = failed.iter().filter_map(|m| m.message.clone()).collect();
        (CheckResult::Failed, format!("breach: {}", what.join("; ")))
    } else if !inconclusive.is_empty() {
        let what: Vec<String> = inconclusive
            .iter()
            .map(|m| format!("{}: {}", m.name, m.message.as_deref().unwrap_or("no data")))
            .collect();
        (
            CheckResult::Inconclusive,
            format!("inconclusive: {}", what.join("; ")),
        )
    } else if metrics.is_empty() {
        (CheckResult::Passed, "no metrics configured".to_owned())
    } else {
        let what: Vec<String> = metrics
            .iter()
            .map(|m| {
                format!(
                    "{} {} ({})",
                    m.name,
                    m.display.as_deref().unwrap_or("?"),
                    m.threshold
                )
            })
            .collect();
        (CheckResult::Passed, format!("passed: {}", what.join(", ")))
    };
    AnalysisOutcome {
        result,
        metrics,
        latency_p95,
        error_rate,
        weight_check,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakePrometheus {
        answers: HashMap<String, Result<Vec<f64>, String>>,
        down: bool,
    }

    impl Querier for FakePrometheus {
        async fn query(&self, promql: &str) -> Result<Vec<f64>, String> {
            if self.down {
                return Err("connection refused".to_owned());
            }
            self.answers.get(promql).cloned().unwrap_or(Ok(vec![]))
        }
    }

    fn vars() -> Vars {
        Vars {
            namespace: "ml".into(),
            rollout: "search".into(),
            canary_color: Color::Green,
            stable_color: Color::Blue,
            canary_revision: "c1".into(),
            stable_revision: "s1".into(),
            interval: Duration::from_secs(30),
            window: Duration::from_secs(30),
        }
    }

    fn spec(metrics: serde_json::Value) -> AnalysisSpec {
        serde_json::from_value(serde_json::json!({
            "prometheus": {"address": "http://prometheus:9090"},
            "minRequests": 50,
            "metrics": metrics
        }))
        .unwrap()
    }

    fn prometheus(entries: &[(String, Vec<f64>)]) -> FakePrometheus {
        let v = vars();
        FakePrometheus {
            answers: entries
                .iter()
                .map(|(q, a)| (render(q, &v).unwrap(), Ok(a.clone())))
                .collect(),
            down: false,
        }
    }

    fn traffic(canary: f64, stable: f64) -> Vec<(String, Vec<f64>)> {
        vec![
            (requests_query(Side::Canary), vec![canary]),
            (requests_query(Side::Stable), vec![stable]),
        ]
    }

    #[test]
    fn render_substitutes_and_rejects_unknown_placeholders() {
        let q = render(&p95_query(Side::Canary), &vars()).unwrap();
        assert_eq!(
            q,
            "histogram_quantile(0.95, sum by (le) (rate(embedder_request_duration_seconds_bucket\
             {namespace=\"ml\",rollout=\"search\",color=\"green\",revision=\"c1\"}[30s])))"
        );
        assert!(
            render(&p95_query(Side::Stable), &vars())
                .unwrap()
                .contains("[330s]")
        );
        // A step held an hour at 100% (stable gets nothing): the baseline still reaches back
        // to 10 intervals before the step began.
        let baked = Vars {
            window: Duration::from_secs(3600),
            ..vars()
        };
        assert!(
            render(&p95_query(Side::Stable), &baked)
                .unwrap()
                .contains("[3900s]")
        );
        assert_eq!(
            render("x{{ nope }}", &vars()).unwrap_err(),
            "unknown placeholder {{nope}}"
        );
        assert!(render("x{{interval", &vars()).is_err());
        assert!(error_rate_query().contains("or vector(0)"));
    }

    #[test]
    fn a_metric_with_min_and_max_must_lie_between_them() {
        let metric: MetricSpec = serde_json::from_value(serde_json::json!(
            {"name": "qps", "query": "sum(rate(x[1m]))", "min": "5", "max": "100"}
        ))
        .unwrap();
        let judged = |value: f64| judge(&metric, Ok(value));
        assert_eq!(judged(50.0).result, CheckResult::Passed);
        assert_eq!(judged(50.0).threshold, ">= 5, <= 100");
        let low = judged(2.0);
        assert_eq!(low.result, CheckResult::Failed, "below min");
        assert_eq!(
            low.message.as_deref(),
            Some("qps = 2.0000, limit 5.0000 (>= 5, <= 100)")
        );
        assert_eq!(judged(200.0).result, CheckResult::Failed, "above max");
    }

    #[tokio::test]
    async fn latency_breach_fails_with_value_and_limit() {
        let s = spec(serde_json::json!([{"name": "p95", "preset": "LatencyP95", "max": "35ms"}]));
        let mut answers = traffic(200.0, 1800.0);
        answers.push((p95_query(Side::Canary), vec![0.0412]));
        let out = run(&prometheus(&answers), &s, &vars(), 10).await;
        assert_eq!(out.result, CheckResult::Failed);
        assert_eq!(out.metrics[0].display.as_deref(), Some("41.2ms"));
        assert_eq!(out.summary, "breach: p95 = 41.2ms, limit 35.0ms (<= 35ms)");
        assert_eq!(out.latency_p95, Some(0.0412));
        assert_eq!(out.weight_check.unwrap().result, WeightCheckResult::Matched);
    }

    #[tokio::test]
    async fn passing_checks_pass_and_zero_errors_is_not_missing_data() {
        let s = spec(serde_json::json!([
            {"name": "p95", "preset": "LatencyP95", "max": "35ms"},
            {"name": "errors", "preset": "ErrorRate", "max": "0.01"},
            {"name": "vs", "preset": "LatencyP95VsStable", "maxIncrease": "5ms"}
        ]));
        let mut answers = traffic(100.0, 900.0);
        answers.push((p95_query(Side::Canary), vec![0.020]));
        answers.push((p95_query(Side::Stable), vec![0.018]));
        answers.push((error_rate_query(), vec![0.0]));
        let out = run(&prometheus(&answers), &s, &vars(), 10).await;
        assert_eq!(out.result, CheckResult::Passed, "{}", out.summary);
        assert_eq!(out.error_rate, Some(0.0));
        assert!((out.metrics[2].value.unwrap() - 0.002).abs() < 1e-9);
    }

    #[tokio::test]
    async fn empty_results_nan_and_outages_are_inconclusive_never_passed() {
        let s = spec(serde_json::json!([{"name": "p95", "preset": "LatencyP95", "max": "35ms"}]));
        // Enough traffic, but the histogram query returns nothing.
        let out = run(&prometheus(&traffic(100.0, 900.0)), &s, &vars(), 10).await;
        assert_eq!(out.result, CheckResult::Inconclusive);
        assert_eq!(out.metrics[0].message.as_deref(), Some("no data"));
        // NaN (0/0 in histogram_quantile).
        let mut answers = traffic(100.0, 900.0);
        answers.push((p95_query(Side::Canary), vec![f64::NAN]));
        assert_eq!(
            run(&prometheus(&answers), &s, &vars(), 10).await.result,
            CheckResult::Inconclusive
        );
        // Prometheus down.
        let down = FakePrometheus {
            answers: HashMap::new(),
            down: true,
        };
        let out = run(&down, &s, &vars(), 10).await;
        assert_eq!(out.result, CheckResult::Inconclusive);
        assert!(
            out.summary.contains("connection refused"),
            "{}",
            out.summary
        );
        assert!(out.weight_check.is_none());
    }

    #[tokio::test]
    async fn too_few_requests_is_inconclusive_even_with_a_bad_value() {
        let s = spec(serde_json::json!([{"name": "p95", "preset": "LatencyP95", "max": "35ms"}]));
        let mut answers = traffic(12.0, 900.0);
        answers.push((p95_query(Side::Canary), vec![9.0]));
        let out = run(&prometheus(&answers), &s, &vars(), 1).await;
        assert_eq!(out.result, CheckResult::Inconclusive);
        assert!(
            out.summary.contains(
                "12 canary requests since the step began (30s), fewer than minRequests 50"
            ),
            "{}",
            out.summary
        );
    }

    #[tokio::test]
    async fn custom_queries_render_and_need_exactly_one_series() {
        let s = spec(serde_json::json!([
            {"name": "dims", "query": "max(embedder_dims{color=\"{{canaryColor}}\"})", "min": "384"}
        ]));
        let mut answers = traffic(100.0, 900.0);
        answers.push((
            "max(embedder_dims{color=\"{{canaryColor}}\"})".to_owned(),
            vec![384.0],
        ));
        assert_eq!(
            run(&prometheus(&answers), &s, &vars(), 10).await.result,
            CheckResult::Passed
        );
        answers.pop();
        answers.push((
            "max(embedder_dims{color=\"{{canaryColor}}\"})".to_owned(),
            vec![1.0, 2.0],
        ));
        let out = run(&prometheus(&answers), &s, &vars(), 10).await;
        assert_eq!(out.result, CheckResult::Inconclusive);
        assert!(out.summary.contains("returned 2 series"));
    }

    #[test]
    fn weight_check_allows_sampling_noise_and_flags_real_mismatches() {
        assert_eq!(
            weight_check(10, 95.0, 905.0, 2).result,
            WeightCheckResult::Matched
        );
        assert_eq!(
            weight_check(10, 300.0, 700.0, 2).result,
            WeightCheckResult::Mismatched
        );
        // 1% of 300 requests is 3 expected: too few to judge.
        assert_eq!(
            weight_check(1, 0.0, 300.0, 2).result,
            WeightCheckResult::InsufficientTraffic
        );
        // Small samples get a wider band than the configured tolerance.
        assert_eq!(
            weight_check(50, 60.0, 40.0, 2).result,
            WeightCheckResult::Matched
        );
        assert_eq!(
            weight_check(100, 1000.0, 0.0, 2).result,
            WeightCheckResult::Matched
        );
        assert_eq!(
            weight_check(100, 500.0, 500.0, 2).result,
            WeightCheckResult::Mismatched
        );
        assert_eq!(
            weight_check(50, 500.0, 500.0, 2)
                .observed_percent
                .as_deref(),
            Some("50.0")
        );
    }

    #[tokio::test]
    async fn an_unscraped_canary_is_told_apart_from_a_quiet_one() {
        let s = spec(serde_json::json!([{"name": "p95", "preset": "LatencyP95", "max": "35ms"}]));
        // No request series and no `up` series: Prometheus does not scrape the canary's pods.
        let out = run(&prometheus(&[]), &s, &vars(), 1).await;
        assert_eq!(out.result, CheckResult::Inconclusive);
        assert!(
            out.summary
                .contains("Prometheus has no series for the canary's pods")
                && out.summary.contains("containerPort")
                && out.summary.contains("PodMonitor"),
            "{}",
            out.summary
        );
        // Scraped, no requests yet: a count of zero.
        let out = run(&prometheus(&[(scraped_query(), vec![1.0])]), &s, &vars(), 1).await;
        assert!(
            out.summary
                .contains("0 canary requests since the step began"),
            "{}",
            out.summary
        );
    }

    #[tokio::test]
    async fn checks_judge_the_whole_step_not_the_last_interval() {
        // A quiet service: 0.2 canary requests per 3s interval never reach minRequests in one
        // interval, but 100s into the step the window holds them.
        let s = spec(serde_json::json!([{"name": "p95", "preset": "LatencyP95", "max": "35ms"}]));
        let mut v = vars();
        v.interval = Duration::from_secs(3);
        v.window = Duration::from_secs(300);
        let window_answers: Vec<(String, Vec<f64>)> = vec![
            (requests_query(Side::Canary), vec![60.0]),
            (requests_query(Side::Stable), vec![5900.0]),
            (p95_query(Side::Canary), vec![0.020]),
        ];
        let querier = FakePrometheus {
            answers: window_answers
                .iter()
                .map(|(q, a)| (render(q, &v).unwrap(), Ok(a.clone())))
                .collect(),
            down: false,
        };
        let out = run(&querier, &s, &v, 1).await;
        assert_eq!(out.result, CheckResult::Passed, "{}", out.summary);
        assert!(
            render(&requests_query(Side::Canary), &v)
                .unwrap()
                .contains("[300s]")
        );
    }
}
