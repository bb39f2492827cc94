//! `--chart FILE`: an SVG of the run, second by second. Top: records acked per second.
//! Bottom: ack-latency p50 and p99 of each second, on a log scale (a stall of seconds and a
//! steady 5 ms must both stay readable). Dashed lines mark where sending started (every
//! device had its connect token), where measuring started (after the warmup) and where
//! sending stopped, so that a person sees which part of the curve the table summarises.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::config::Mode;
use crate::report::{Report, SeriesPoint};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 820;
const FONT: &str = "sans-serif";
const RATE: RGBColor = RGBColor(31, 119, 180);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(214, 39, 40);
const MARK: RGBColor = RGBColor(110, 110, 110);
/// The measured window's band, and its (more visible) legend key.
const WINDOW: RGBAColor = RGBAColor(255, 190, 0, 0.10);
const WINDOW_KEY: RGBAColor = RGBAColor(255, 190, 0, 0.35);
/// Up to this many points, each gets a dot (an isolated second then still shows).
const MAX_DOTS: usize = 240;

type DrawResult<T> = Result<T, String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing the chart: {e:?}")
}

/// The runs of points that have a value, as line segments: a second without acks (no
/// latency) leaves a gap instead of a line drawn across it. A second missing from the series
/// (the sampler ran late) is bridged: the next point's rate covers the time since the last.
fn segments(
    series: &[SeriesPoint],
    f: impl Fn(&SeriesPoint) -> Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut open = false;
    for p in series {
        match f(p) {
            Some(v) => {
                let x = p.t_s as f64;
                match out.last_mut() {
                    Some(seg) if open => seg.push((x, v)),
                    _ => out.push(vec![(x, v)]),
                }
                open = true;
            }
            None => open = false,
        }
    }
    out
}

/// Thousands separated by a thin space, for axis labels.
fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A latency label to three significant digits: ms below a second, s above.
fn latency_label(ms: f64) -> String {
    let (v, unit) = if ms >= 1000.0 {
        (ms / 1000.0, "s")
    } else {
        (ms, "ms")
    };
    let decimals = match v {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        _ => 2,
    };
    let text = format!("{v:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text} {unit}")
}

/// The phases of the run on the time axis, in seconds since the start.
struct Phases {
    /// Every device had its first connect token: sending is in full swing.
    ramp_done: f64,
    /// The measured window (after the warmup, until sending stops).
    measure_from: f64,
    send_stop: f64,
}

impl Phases {
    fn of(r: &Report) -> Phases {
        let ramp = r.duration.ramp_s;
        Phases {
            ramp_done: ramp,
            measure_from: ramp + r.duration.warmup_s,
            send_stop: ramp + r.config.duration_s,
        }
    }
}

/// Shades the measured window and marks the end of the connect ramp on a panel whose y range
/// is `y_lo..y_hi`; `legend`: also name them (in the first panel only).
fn draw_phases<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    ph: &Phases,
    y_lo: f64,
    y_hi: f64,
    legend: bool,
) -> DrawResult<()> {
    let band = chart
        .draw_series(std::iter::once(Rectangle::new(
            [(ph.measure_from, y_lo), (ph.send_stop, y_hi)],
            WINDOW.filled(),
        )))
        .map_err(err)?;
    if legend {
        band.label("measured window (after warmup)")
            .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 24, y + 6)], WINDOW_KEY.filled()));
    }
    if ph.ramp_done > 0.0 {
        let line = chart
            .draw_series(DashedLineSeries::new(
                [(ph.ramp_done, y_lo), (ph.ramp_done, y_hi)],
                6,
                4,
                MARK.stroke_width(1),
            ))
            .map_err(err)?;
        if legend {
            line.label("connect ramp done (dashed)")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], MARK.stroke_width(1)));
        }
    }
    Ok(())
}

fn draw(root: &DrawingArea<SVGBackend<'_>, Shift>, r: &Report) -> DrawResult<()> {
    root.fill(&WHITE).map_err(err)?;
    let c = &r.config;
    let load = match c.mode {
        Mode::Closed => format!("closed loop, in-flight {}", c.in_flight),
        Mode::Open => format!(
            "open loop, {} records/s offered",
            thousands(c.rate_records_per_s)
        ),
    };
    let title = format!(
        "loadgen: {} devices, {:?} codec {}, {} records/frame, {load}",
        thousands(c.devices as f64),
        c.transport,
        c.codec.name(),
        c.records_per_frame
    )
    .replace("Tcp", "TCP")
    .replace("Udp", "UDP");
    let root = root.titled(&title, (FONT, 22)).map_err(err)?;
    let l = &r.latency_ms;
    let summary = format!(
        "measured {:.0} s: {} records/s acked, ack latency p50 {} / p99 {} / max {}; connect errors {}, never connected {}",
        r.duration.measured_s,
        thousands(r.records.per_s),
        latency_label(l.p50),
        latency_label(l.p99),
        latency_label(l.max),
        r.connects.errors,
        r.devices.never_connected
    );
    let (summary_area, panels) = root.split_vertically(28);
    summary_area
        .draw(&Text::new(
            summary,
            (60, 4),
            (FONT, 15).into_font().color(&BLACK.mix(0.75)),
        ))
        .map_err(err)?;
    let (upper, lower) = panels.split_vertically((HEIGHT - 60) / 2);

    let last_t = r.series.last().map_or(0, |p| p.t_s) as f64;
    let ph = Phases::of(r);
    let x_max = last_t.max(ph.send_stop).max(1.0).ceil() + 1.0;
    let dots = r.series.len() <= MAX_DOTS;

    // Records per second.
    let rate_max = r
        .series
        .iter()
        .map(|p| p.records_per_s)
        .fold(c.rate_records_per_s, f64::max);
    let y_hi = if rate_max > 0.0 { rate_max * 1.18 } else { 1.0 };
    let mut top = ChartBuilder::on(&upper)
        .margin_left(10)
        .margin_right(30)
        .margin_top(20)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .caption("Records acked per second", (FONT, 18))
        .build_cartesian_2d(0f64..x_max, 0f64..y_hi)
        .map_err(err)?;
    top.configure_mesh()
        .x_desc("seconds since start")
        .y_desc("records/s")
        .y_label_formatter(&|v| thousands(*v))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    draw_phases(&mut top, &ph, 0.0, y_hi, true)?;
    let mut first = true;
    for seg in segments(&r.series, |p| Some(p.records_per_s)) {
        top.draw_series(AreaSeries::new(seg.clone(), 0.0, RATE.mix(0.15)))
            .map_err(err)?;
        if dots {
            top.draw_series(seg.iter().map(|&xy| Circle::new(xy, 2, RATE.filled())))
                .map_err(err)?;
        }
        let s = top
            .draw_series(LineSeries::new(seg, RATE.stroke_width(2)))
            .map_err(err)?;
        if first {
            s.label("records/s acked")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], RATE.stroke_width(3)));
            first = false;
        }
    }
    if c.mode == Mode::Open {
        top.draw_series(DashedLineSeries::new(
            [(0.0, c.rate_records_per_s), (x_max, c.rate_records_per_s)],
            10,
            6,
            BLACK.mix(0.75).stroke_width(2),
        ))
        .map_err(err)?
        .label("offered (dashed)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BLACK.mix(0.75).stroke_width(2)));
    }
    top.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;

    // Ack latency, log scale.
    let lat: Vec<f64> = r
        .series
        .iter()
        .flat_map(|p| [p.p50_ms, p.p99_ms])
        .flatten()
        .filter(|v| *v > 0.0)
        .collect();
    let lo = lat.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = lat.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if lat.is_empty() {
        (0.1, 10.0)
    } else {
        // Whole decades, so the axis reads 1 ms, 10 ms, 100 ms ...
        (
            10f64.powf(lo.log10().floor()).max(0.001),
            10f64.powf((hi * 1.05).log10().ceil()).max(lo * 10.0),
        )
    };
    let mut bottom = ChartBuilder::on(&lower)
        .margin_left(10)
        .margin_right(30)
        .margin_top(10)
        .margin_bottom(10)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .caption("Ack latency per second (log scale)", (FONT, 18))
        .build_cartesian_2d(0f64..x_max, (lo..hi).log_scale())
        .map_err(err)?;
    bottom
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("ack latency")
        .y_label_formatter(&|v| latency_label(*v))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    draw_phases(&mut bottom, &ph, lo, hi, false)?;
    for (name, color, f) in [
        (
            "p99",
            P99,
            (|p: &SeriesPoint| p.p99_ms) as fn(&SeriesPoint) -> Option<f64>,
        ),
        ("p50", P50, |p: &SeriesPoint| p.p50_ms),
    ] {
        let mut first = true;
        for seg in segments(&r.series, |p| f(p).map(|v| v.max(lo))) {
            if dots {
                bottom
                    .draw_series(seg.iter().map(|&xy| Circle::new(xy, 2, color.filled())))
                    .map_err(err)?;
            }
            let s = bottom
                .draw_series(LineSeries::new(seg, color.stroke_width(2)))
                .map_err(err)?;
            if first {
                s.label(format!("{name} of the second"))
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
                    });
                first = false;
            }
        }
    }
    bottom
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// The chart of `r` as an SVG document.
///
/// # Errors
/// A drawing error (none is expected with an in-memory SVG).
pub fn render_svg(r: &Report) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, r)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;
    use crate::stats::Stats;

    fn report() -> Report {
        let series = (1..=30)
            .map(|t| {
                let idle = t == 12; // a second without acks
                SeriesPoint {
                    t_s: t,
                    records_per_s: if idle {
                        0.0
                    } else {
                        40_000.0 + 100.0 * t as f64
                    },
                    p50_ms: (!idle).then_some(5.0 + t as f64 * 0.1),
                    p99_ms: (!idle).then_some(if t == 20 { 2500.0 } else { 40.0 }),
                    ..SeriesPoint::default()
                }
            })
            .collect();
        Report::from_run(sample(), &Stats::new(), series, 30.0, false, false)
    }

    #[test]
    fn seconds_without_acks_split_the_lines_missing_samples_do_not() {
        let mut r = report();
        let segs = segments(&r.series, |p| p.p99_ms);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].len(), 11);
        assert_eq!(segs[1].len(), 18);
        // A sampler that ran late leaves seconds out: the line goes on across them.
        r.series.retain(|p| !(3..=6).contains(&p.t_s));
        let segs = segments(&r.series, |p| Some(p.records_per_s));
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0][1..3], [(2.0, 40_200.0), (7.0, 40_700.0)]);
    }

    #[test]
    fn svg_has_axes_labels_and_legend() {
        let svg = render_svg(&report()).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..60.min(svg.len())]);
        for text in [
            "Records acked per second",
            "Ack latency per second",
            "seconds since start",
            "records/s acked",
            "p99 of the second",
            "p50 of the second",
            "measured window (after warmup)",
            "connect ramp done (dashed)",
            "40,000",
            "1 s",
        ] {
            assert!(svg.contains(text), "{text:?} not in the chart");
        }
    }

    #[test]
    fn labels_read_well() {
        assert_eq!(thousands(45_120.4), "45,120");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(latency_label(0.5), "0.5 ms");
        assert_eq!(latency_label(10.0), "10 ms");
        assert_eq!(latency_label(1000.0), "1 s");
        assert_eq!(latency_label(2500.0), "2.5 s");
        assert_eq!(latency_label(202.879), "203 ms");
        assert_eq!(latency_label(12.631), "12.6 ms");
        assert_eq!(latency_label(1545.215), "1.55 s");
        assert_eq!(latency_label(1.272), "1.27 ms");
    }
}
