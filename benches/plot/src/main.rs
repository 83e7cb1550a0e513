//! Draws the sweep of `scripts/vm.sh bench`: nvcopy's data-phase MB/s against queue depth,
//! one line per chunk size.
//!
//!     cargo run -p nvcopy-bench-plot --release -- benches/results/vm-bench.json benches/results/sweep.png
//!
//! Text is drawn with an embedded DejaVu Sans through ab_glyph, so the binary needs no
//! system fonts, fontconfig or freetype.

use std::collections::BTreeMap;
use std::error::Error;
use std::process::ExitCode;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// (chunk bytes) -> [(queue depth, MB/s)], sorted by queue depth.
type Series = BTreeMap<u64, Vec<(u64, f64)>>;

fn sweep(json: &Value) -> Result<Series> {
    let points = json
        .get("sweep")
        .and_then(Value::as_array)
        .ok_or("the JSON has no \"sweep\" array (was the sweep skipped?)")?;
    let mut s = Series::new();
    for p in points {
        let (Some(chunk), Some(qd), Some(rate)) = (
            p.get("chunk_bytes").and_then(Value::as_u64),
            p.get("qd").and_then(Value::as_u64),
            p.get("rate_mb_s").and_then(Value::as_f64),
        ) else {
            continue;
        };
        s.entry(chunk).or_default().push((qd, rate));
    }
    for v in s.values_mut() {
        v.sort_by_key(|&(qd, _)| qd);
    }
    if s.is_empty() {
        return Err("the sweep has no usable points".into());
    }
    Ok(s)
}

fn chunk_label(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

fn draw(series: &Series, subtitle: &str, out: &str) -> Result<()> {
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the embedded DejaVu Sans font did not load")?;
    // Queue depths are powers of two: the x axis is log2(qd), labelled with qd. MB/s spans
    // two orders of magnitude between 4 KiB and 512 KiB chunks: the y axis is log10.
    let pos = |qd: u64| (qd.max(1) as f64).log2();
    let max_x = series
        .values()
        .flatten()
        .map(|&(q, _)| pos(q))
        .fold(1.0f64, f64::max);
    let rates = || series.values().flatten().map(|&(_, r)| r.max(0.1));
    let max_rate = rates().fold(1.0f64, f64::max);
    let min_rate = rates().fold(max_rate, f64::min);
    let y_lo = min_rate / 1.5;

    let root = BitMapBackend::new(out, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title_area, chart_area) = root.split_vertically(60);
    title_area.draw(&Text::new(
        "nvcopy copy 1 -> 1: data-phase MB/s by queue depth, one line per chunk size",
        (20, 8),
        ("sans-serif", 22).into_font(),
    ))?;
    title_area.draw(&Text::new(
        subtitle.to_string(),
        (20, 36),
        ("sans-serif", 15).into_font().color(&RGBColor(90, 90, 90)),
    ))?;

    let mut chart = ChartBuilder::on(&chart_area)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2..max_x + 0.2, (y_lo..max_rate * 1.6).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("queue depth (chunks in flight, log scale)")
        .y_desc("MB/s (10^6 bytes/s, log scale)")
        .x_labels(max_x as usize + 1)
        .x_label_formatter(&|x| format!("{}", 2f64.powf(x.round()) as u64))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;

    for (i, (chunk, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(q, r)| (pos(q), r.max(0.1))),
                style,
            ))?
            .label(chunk_label(*chunk))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(pts.iter().map(|&(q, r)| {
            Circle::new((pos(q), r.max(0.1)), 3, ShapeStyle::from(&color).filled())
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn subtitle(json: &Value) -> String {
    let m = &json["machine"];
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let date = s(&json["date"]);
    format!(
        "{}; host: {} cores, {}; {}, TCG, emulated IOMMU",
        date.get(..10).unwrap_or(&date),
        m["nproc"].as_u64().unwrap_or(0),
        s(&m["cpu_model"]),
        s(&m["qemu"])
            .split(" (")
            .next()
            .unwrap_or("QEMU")
            .replace("QEMU emulator version", "QEMU"),
    )
}

fn run() -> Result<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        return Err("usage: nvcopy-bench-plot VM-BENCH.json OUT.png".into());
    };
    let text = std::fs::read_to_string(input).map_err(|e| format!("cannot read {input}: {e}"))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format!("{input}: {e}"))?;
    let series = sweep(&json)?;
    draw(&series, &subtitle(&json), output)?;
    Ok(output.clone())
}

fn main() -> ExitCode {
    match run() {
        Ok(out) => {
            println!("wrote {out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nvcopy-bench-plot: {e}");
            ExitCode::FAILURE
        }
    }
}
