//! What a run leaves behind: `latest.json` (every figure), `latest.md` (the
//! same as tables) and two plots, `latency.svg` (p50/p95/p99 per scenario,
//! one panel per concurrency) and `throughput.svg` (requests per second
//! against concurrency, with the bare tonic service as the ceiling).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Context as _;
use plotters::{coord::ranged1d::SegmentValue, prelude::*};
use serde::{Deserialize, Serialize};

use crate::baselines::Baseline;

/// One scenario at one concurrency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub scenario: String,
    pub concurrency: usize,
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: BTreeMap<String, u64>,
    /// This scenario's throughput over the bare tonic service's, and its p50
    /// over the bare service's, at the same concurrency.
    pub rps_vs_tonic: Option<f64>,
    pub p50_vs_tonic: Option<f64>,
    /// The reference server measured right before this, at the same
    /// concurrency (`references`), and this scenario's throughput and p50
    /// over its.
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub rps_vs_reference: Option<f64>,
    #[serde(default)]
    pub p50_vs_reference: Option<f64>,
    /// The service's largest resident set seen while this ran, in MiB.
    pub service_rss_mib: Option<f64>,
}

/// The service's resident memory (VmRSS), in MiB.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    /// After start-up, before any call.
    pub idle_rss_mib: Option<f64>,
    /// The largest seen while the scenarios ran.
    pub peak_rss_mib: Option<f64>,
    /// After the last scenario, the service idle again.
    pub after_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub duration_ms: u128,
    pub warmup_ms: u128,
    pub concurrency: Vec<usize>,
    pub fixture_users: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Seconds since the Unix epoch.
    pub finished_at: u64,
    pub settings: Settings,
    pub service_memory: Memory,
    pub results: Vec<Measurement>,
    pub baselines: Vec<Baseline>,
}

impl Report {
    /// Writes the JSON, the Markdown and the plots into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("latest.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("latest.md"), self.markdown())?;
        latency_plot(&self.results, &dir.join("latency.svg"))?;
        throughput_plot(&self.results, &self.baselines, &dir.join("throughput.svg"))?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let ratio = |r: Option<f64>| r.map_or_else(String::new, |r| format!("{r:.2}x"));
        let mib = |m: Option<f64>| m.map_or_else(|| "n/a".to_owned(), |m| format!("{m:.1} MiB"));
        let _ = writeln!(
            md,
            "{} s per scenario after a {} s warm-up, at {:?} callers.\n",
            self.settings.duration_ms as f64 / 1000.0,
            self.settings.warmup_ms as f64 / 1000.0,
            self.settings.concurrency
        );
        md.push_str(
            "| scenario | callers | rps | p50 ms | p95 ms | p99 ms | max ms | rps vs tonic | p50 vs tonic | rps vs reference | p50 vs reference | service RSS | errors |\n",
        );
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for r in &self.results {
            let errors = if r.errors.is_empty() {
                String::new()
            } else {
                r.errors
                    .iter()
                    .map(|(code, n)| format!("{code}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.concurrency,
                r.rps,
                r.p50_ms,
                r.p95_ms,
                r.p99_ms,
                r.max_ms,
                ratio(r.rps_vs_tonic),
                ratio(r.p50_vs_tonic),
                ratio(r.rps_vs_reference),
                ratio(r.p50_vs_reference),
                mib(r.service_rss_mib),
                errors
            );
        }
        let paired: Vec<_> = self
            .results
            .iter()
            .filter_map(|r| Some((r, r.reference.as_deref()?)))
            .collect();
        if !paired.is_empty() {
            md.push_str(
                "\n| scenario | callers | against | rps vs reference | p50 vs reference |\n|---|---:|---|---:|---:|\n",
            );
            for (r, reference) in paired {
                let _ = writeln!(
                    md,
                    "| {} | {} | {reference} | {} | {} |",
                    r.scenario,
                    r.concurrency,
                    ratio(r.rps_vs_reference),
                    ratio(r.p50_vs_reference)
                );
            }
        }
        if !self.baselines.is_empty() {
            md.push_str("\n| baseline | callers | rps | p50 ms |\n|---|---:|---:|---:|\n");
            for b in &self.baselines {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {} |",
                    b.name,
                    b.concurrency,
                    b.rps,
                    b.p50_ms.map_or_else(String::new, |p| format!("{p:.3}"))
                );
            }
        }
        let m = &self.service_memory;
        let _ = writeln!(
            md,
            "\nService resident memory: {} idle, {} at peak under load, {} after the run.",
            mib(m.idle_rss_mib),
            mib(m.peak_rss_mib),
            mib(m.after_rss_mib)
        );
        md
    }
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The scenarios in the order they ran, each once.
fn scenarios(results: &[Measurement]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    names
}

fn levels(results: &[Measurement]) -> Vec<usize> {
    let mut levels: Vec<usize> = results.iter().map(|r| r.concurrency).collect();
    levels.sort_unstable();
    levels.dedup();
    levels
}

/// Bounds of a log axis that hold every value in `values`, padded.
fn log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.01, 1.0);
    }
    (lo / 2.0, hi * 2.0)
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e}")
}

/// The legend of a chart's labelled series, in a bordered box at `position`
/// over a white background of `opacity`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    opacity: f64,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(opacity))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

/// A percentile's name, how to read it, and its colour.
type Percentile = (&'static str, fn(&Measurement) -> f64, RGBColor);

/// p50, p95 and p99 per scenario as overlaid horizontal bars (p99 behind,
/// p50 in front), on a log scale, one panel per concurrency.
fn latency_plot(results: &[Measurement], path: &Path) -> anyhow::Result<()> {
    let names = scenarios(results);
    let levels = levels(results);
    if names.is_empty() {
        return Ok(());
    }
    let height = (60 + 34 * names.len() as u32) * levels.len() as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let panels = root.split_evenly((levels.len(), 1));
    let (lo, hi) = log_bounds(
        results
            .iter()
            .flat_map(|r| [r.p50_ms, r.p99_ms].into_iter()),
    );
    let percentiles: [Percentile; 3] = [
        ("p99", |r| r.p99_ms, RGBColor(198, 219, 239)),
        ("p95", |r| r.p95_ms, RGBColor(107, 174, 214)),
        ("p50", |r| r.p50_ms, RGBColor(33, 113, 181)),
    ];
    for (panel, &level) in panels.iter().zip(&levels) {
        // Integer ranges are inclusive: 0..=len-1 is one segment per scenario.
        let rows = (0..names.len() - 1).into_segmented();
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("Latency per scenario, {level} caller(s) (ms, log scale)"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(200)
            .build_cartesian_2d((lo..hi * 4.0).log_scale(), rows)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(names.len())
            .y_label_formatter(&|v| match v {
                // The first scenario on top.
                SegmentValue::CenterOf(i) => names
                    .len()
                    .checked_sub(i + 1)
                    .and_then(|k| names.get(k))
                    .map_or_else(String::new, |n| (*n).to_owned()),
                _ => String::new(),
            })
            .y_label_style(("sans-serif", 13))
            .x_label_formatter(&|v| format!("{v}"))
            .draw()
            .map_err(plot_error)?;
        for (label, value, color) in percentiles {
            chart
                .draw_series(names.iter().enumerate().filter_map(|(i, name)| {
                    let r = results
                        .iter()
                        .find(|r| r.scenario == *name && r.concurrency == level)?;
                    let row = names.len() - 1 - i;
                    let mut bar = Rectangle::new(
                        [
                            (lo, SegmentValue::Exact(row)),
                            (value(r).max(lo), SegmentValue::Exact(row + 1)),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(4, 4, 0, 0);
                    Some(bar)
                }))
                .map_err(plot_error)?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight, 0.8)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Requests per second against concurrency, one line per scenario and a
/// dashed one for the bare tonic service.
fn throughput_plot(
    results: &[Measurement],
    baselines: &[Baseline],
    path: &Path,
) -> anyhow::Result<()> {
    let names = scenarios(results);
    let levels = levels(results);
    if names.is_empty() {
        return Ok(());
    }
    let tonic: Vec<(usize, f64)> = baselines
        .iter()
        .filter(|b| b.name == "tonic_bare")
        .map(|b| (b.concurrency, b.rps))
        .collect();
    let (lo, hi) = log_bounds(
        results
            .iter()
            .map(|r| r.rps)
            .chain(tonic.iter().map(|(_, rps)| *rps)),
    );
    let max_level = *levels.last().unwrap_or(&1) as f64;
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput against concurrency (requests/s, log scale)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(0)
        // Room on the right for the legend.
        .build_cartesian_2d((0.8..max_level * 6.0).log_scale(), (lo..hi).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("concurrent callers")
        .y_desc("requests/s")
        .draw()
        .map_err(plot_error)?;
    for (k, name) in names.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<(f64, f64)> = levels
            .iter()
            .filter_map(|&level| {
                results
                    .iter()
                    .find(|r| r.scenario == *name && r.concurrency == level)
                    .map(|r| (level as f64, r.rps.max(lo)))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(plot_error)?;
    }
    if !tonic.is_empty() {
        let points: Vec<(f64, f64)> = tonic.iter().map(|(c, rps)| (*c as f64, *rps)).collect();
        chart
            .draw_series(DashedLineSeries::new(points, 8, 5, BLACK.stroke_width(2)))
            .map_err(plot_error)?
            .label("bare tonic service (ceiling)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 0.85)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(scenario: &str, concurrency: usize, p50: f64) -> Measurement {
        Measurement {
            scenario: scenario.into(),
            concurrency,
            requests: 100,
            rps: 1000.0 / p50 * concurrency as f64,
            p50_ms: p50,
            p95_ms: p50 * 2.0,
            p99_ms: p50 * 3.0,
            max_ms: p50 * 4.0,
            errors: BTreeMap::from([("Unavailable".to_owned(), 2)]),
            rps_vs_tonic: Some(0.5),
            p50_vs_tonic: None,
            reference: (scenario == "get_user_hit").then(|| "reference_redis_get".into()),
            rps_vs_reference: (scenario == "get_user_hit").then_some(0.8),
            p50_vs_reference: (scenario == "get_user_hit").then_some(1.2),
            service_rss_mib: Some(42.0),
        }
    }

    #[test]
    fn writes_json_markdown_and_both_plots() {
        let dir = std::env::temp_dir().join(format!("datagate-bench-{}", std::process::id()));
        let report = Report {
            finished_at: 0,
            settings: Settings {
                duration_ms: 2000,
                warmup_ms: 500,
                concurrency: vec![1, 4],
                fixture_users: 10,
            },
            service_memory: Memory {
                idle_rss_mib: Some(20.0),
                peak_rss_mib: Some(60.5),
                after_rss_mib: None,
            },
            results: vec![
                measurement("get_user_hit", 1, 0.4),
                measurement("get_user_hit", 4, 0.6),
                measurement("search_uncached", 1, 3.0),
                measurement("search_uncached", 4, 5.0),
            ],
            baselines: vec![Baseline {
                name: "tonic_bare".into(),
                concurrency: 1,
                rps: 6000.0,
                p50_ms: Some(0.15),
            }],
        };
        report.write(&dir).unwrap();

        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("latest.json")).unwrap()).unwrap();
        assert_eq!(json["results"].as_array().unwrap().len(), 4);
        assert_eq!(json["results"][1]["concurrency"], 4);
        assert_eq!(json["service_memory"]["peak_rss_mib"], 60.5);
        let md = std::fs::read_to_string(dir.join("latest.md")).unwrap();
        assert!(md.contains("| search_uncached | 4 | 800 | 5.000 | 10.000 | 15.000 | 20.000 | 0.50x |  |  |  | 42.0 MiB | Unavailable: 2 |"), "{md}");
        assert!(
            md.contains("| get_user_hit | 4 | reference_redis_get | 0.80x | 1.20x |"),
            "{md}"
        );
        assert!(!md.contains("| search_uncached | 1 | reference"), "{md}");
        assert!(md.contains("| tonic_bare | 1 | 6000 | 0.150 |"), "{md}");
        assert!(
            md.contains("20.0 MiB idle, 60.5 MiB at peak under load, n/a after the run"),
            "{md}"
        );
        let latency = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(latency.starts_with("<svg"));
        assert!(latency.contains("search_uncached") && latency.contains("4 caller(s)"));
        let throughput = std::fs::read_to_string(dir.join("throughput.svg")).unwrap();
        assert!(throughput.contains("bare tonic service (ceiling)"));
        assert!(throughput.contains("get_user_hit"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
