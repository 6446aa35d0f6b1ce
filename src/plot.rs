//! The load generator's PNG latency plot (plotters): latency over the run
//! (p50, p99 and max per second of scheduled send time) above the whole
//! run's latency by percentile, both on a logarithmic millisecond scale.

use anyhow::Context as _;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

const SERIES: [(&str, RGBColor); 3] = [("p50", BLUE), ("p99", RED), ("max", BLACK)];

/// Registers the TrueType font at `font` as the plot's sans-serif face (once).
fn register_font(font: &Path) -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(font).map_err(|e| {
                format!("reading the plot font {} ({e}); install fonts-dejavu-core or pass --font", font.display())
            })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a TrueType font", font.display()))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Writes the plot of `all` and `per_second` (microseconds) to `path`.
pub fn latency_png(
    path: &Path,
    font: &Path,
    title: &str,
    all: &Histogram<u64>,
    per_second: &[Histogram<u64>],
) -> anyhow::Result<()> {
    register_font(font)?;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 26))?;
        let (top, bottom) = root.split_vertically(430);
        let highest = ms(all.max()).max(1.0) * 1.5;
        let lowest = (ms(all.min()) / 1.5).clamp(0.01, 1.0);

        let seconds = per_second.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&top)
            .caption("latency over the run (by scheduled send second)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..seconds, (lowest..highest).log_scale())?;
        chart.configure_mesh().x_desc("second of the run").y_desc("send → receive, ms").draw()?;
        for (name, color) in SERIES {
            let points = per_second.iter().enumerate().filter(|(_, h)| !h.is_empty()).map(|(s, h)| {
                let micros = match name {
                    "p50" => h.value_at_quantile(0.5),
                    "p99" => h.value_at_quantile(0.99),
                    _ => h.max(),
                };
                (s as f64 + 0.5, ms(micros).max(lowest))
            });
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

        // x = number of nines: 0 → p0, 1 → p90, 2 → p99, 3 → p99.9 …
        let mut chart = ChartBuilder::on(&bottom)
            .caption("latency by percentile (whole run)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..5f64, (lowest..highest).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(6)
            .x_label_formatter(&|nines| {
                let percent = 100.0 * (1.0 - 10f64.powf(-nines));
                format!("p{}", format!("{percent:.3}").trim_end_matches('0').trim_end_matches('.'))
            })
            .x_desc("percentile")
            .y_desc("send → receive, ms")
            .draw()?;
        let curve = (0..=500).map(|k| {
            let nines = f64::from(k) / 100.0;
            let quantile = 1.0 - 10f64.powf(-nines);
            (nines, ms(all.value_at_quantile(quantile)).max(lowest))
        });
        chart.draw_series(LineSeries::new(curve, RED.stroke_width(2)))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("drawing {}", path.display()))
}
