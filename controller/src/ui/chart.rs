//! Metric plots rendered on the server as SVG with `plotters` (SVG backend only, no fonts
//! loaded: the browser draws the text), so the page needs no charting code of its own.
//!
//! Invariants: pure (no I/O, no clock); any finite input renders, including one point or a flat
//! line; the x axis is the step when every point has one, else the epoch, else the point's index.

use plotters::prelude::*;
use runyard_model::report::MetricPoint;

/// Default and bounds of the image size in pixels.
pub const DEFAULT_SIZE: (u32, u32) = (640, 280);
pub const MIN_SIZE: (u32, u32) = (200, 120);
pub const MAX_SIZE: (u32, u32) = (2000, 1200);

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("cannot draw the plot: {0}")]
    Draw(String),
}

/// What the x axis counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Step,
    Epoch,
    Index,
}

impl Axis {
    fn label(self) -> &'static str {
        match self {
            Axis::Step => "step",
            Axis::Epoch => "epoch",
            Axis::Index => "report",
        }
    }
}

/// The x axis for these points and their coordinates on it.
pub fn coordinates(points: &[MetricPoint]) -> (Axis, Vec<(f64, f64)>) {
    let axis = if points.iter().all(|p| p.step.is_some()) {
        Axis::Step
    } else if points.iter().all(|p| p.epoch.is_some()) {
        Axis::Epoch
    } else {
        Axis::Index
    };
    let xy = points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.value.is_finite())
        .map(|(i, p)| {
            let x = match axis {
                Axis::Step => p.step.unwrap_or_default() as f64,
                Axis::Epoch => p.epoch.unwrap_or_default() as f64,
                Axis::Index => i as f64,
            };
            (x, p.value)
        })
        .collect();
    (axis, xy)
}

/// A range around `lo..hi` that is never empty, with a little room above and below.
fn padded(lo: f64, hi: f64, pad_fraction: f64) -> std::ops::Range<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    let span = hi - lo;
    if span <= f64::EPSILON * lo.abs().max(1.0) {
        let d = (lo.abs() * 0.05).max(0.5);
        return (lo - d)..(hi + d);
    }
    (lo - span * pad_fraction)..(hi + span * pad_fraction)
}

/// Renders `metric` over training as an SVG document of `size` pixels.
pub fn render(
    metric: &str,
    points: &[MetricPoint],
    size: (u32, u32),
) -> Result<String, ChartError> {
    let size = (
        size.0.clamp(MIN_SIZE.0, MAX_SIZE.0),
        size.1.clamp(MIN_SIZE.1, MAX_SIZE.1),
    );
    let (axis, xy) = coordinates(points);
    let (x_lo, x_hi) = xy
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| {
            (lo.min(*x), hi.max(*x))
        });
    let (y_lo, y_hi) = xy
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, y)| {
            (lo.min(*y), hi.max(*y))
        });
    let draw = |e: &dyn std::fmt::Display| ChartError::Draw(e.to_string());
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption(metric, ("sans-serif", 16))
            .x_label_area_size(34)
            .y_label_area_size(60)
            .build_cartesian_2d(padded(x_lo, x_hi, 0.02), padded(y_lo, y_hi, 0.08))
            .map_err(|e| draw(&e))?;
        chart
            .configure_mesh()
            .x_desc(axis.label())
            .light_line_style(RGBColor(238, 238, 238))
            .x_labels(8)
            .y_labels(6)
            .y_label_formatter(&|v| format_value(*v))
            .draw()
            .map_err(|e| draw(&e))?;
        let colour = RGBColor(37, 99, 235);
        chart
            .draw_series(LineSeries::new(xy.iter().copied(), colour.stroke_width(2)))
            .map_err(|e| draw(&e))?;
        // Dots only while they stay readable.
        if xy.len() <= 60 {
            chart
                .draw_series(
                    xy.iter()
                        .map(|(x, y)| Circle::new((*x, *y), 3, colour.filled())),
                )
                .map_err(|e| draw(&e))?;
        }
        root.present().map_err(|e| draw(&e))?;
    }
    Ok(svg)
}

/// Short labels for values of any magnitude.
fn format_value(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s.is_empty() || s == "-" {
            "0".into()
        } else {
            s.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(step: Option<u64>, epoch: Option<u64>, value: f64) -> MetricPoint {
        MetricPoint {
            step,
            epoch,
            value,
            time: None,
        }
    }

    #[test]
    fn axis_prefers_steps_then_epochs_then_index() {
        let (a, xy) = coordinates(&[pt(Some(10), Some(0), 1.0), pt(Some(20), Some(1), 0.5)]);
        assert_eq!((a, xy), (Axis::Step, vec![(10.0, 1.0), (20.0, 0.5)]));
        let (a, xy) = coordinates(&[pt(None, Some(0), 1.0), pt(Some(20), Some(1), 0.5)]);
        assert_eq!((a, xy), (Axis::Epoch, vec![(0.0, 1.0), (1.0, 0.5)]));
        let (a, xy) = coordinates(&[pt(None, None, 1.0), pt(Some(3), None, 0.5)]);
        assert_eq!((a, xy), (Axis::Index, vec![(0.0, 1.0), (1.0, 0.5)]));
    }

    #[test]
    fn renders_a_line_with_labels() {
        let points: Vec<_> = (0..5)
            .map(|i| pt(Some(i * 6), Some(i), 1.0 / (i as f64 + 1.0)))
            .collect();
        let svg = render("val_loss", &points, DEFAULT_SIZE).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("val_loss"));
        assert!(svg.contains("\nstep\n"), "x axis names the step: {svg}");
        assert!(svg.contains("<polyline"), "a line is drawn");
        assert_eq!(svg.matches("<circle").count(), 5);
    }

    #[test]
    fn degenerate_inputs_still_render() {
        for points in [
            vec![],
            vec![pt(Some(3), None, 2.0)],
            vec![pt(Some(1), None, 7.0); 3],
        ] {
            let svg = render("m", &points, (1, 1)).unwrap();
            assert!(svg.contains(&format!("width=\"{}\"", MIN_SIZE.0)), "{svg}");
        }
    }

    #[test]
    fn metric_names_are_escaped() {
        let svg = render(
            "<script>x</script>",
            &[pt(Some(1), None, 1.0)],
            DEFAULT_SIZE,
        )
        .unwrap();
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
    }

    #[test]
    fn value_labels_are_short() {
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(1234.4), "1234");
        assert_eq!(format_value(1e-6), "1.00e-6");
        assert_eq!(format_value(-2.5), "-2.5");
    }
}
