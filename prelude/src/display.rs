//! Rich output. A value is a MIME [`Bundle`] (always with `text/plain`), shown three ways:
//!
//! - as a cell's final value, through evcxr's `evcxr_display` convention (stdout blocks);
//! - mid-cell, as one marker line on stdout ([`MARKER`] + JSON), in order with what the cell
//!   prints (one stream: two pipes read by two threads would reorder them), that the kernel turns into
//!   `display_data` / `update_display_data` and the REPL into terminal output — only when the
//!   front-end asked for it with `HEARTH_DISPLAY=1`; otherwise the `text/plain` part is written;
//! - progress bars reuse one `display_id` and are updated in place.

use crate::error::Result;
use crate::session::Session;
use hearth_api::{SampleInput, SamplingParams};
use plotters::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Prefix of a display line on stdout (and of an error line on stderr).
pub const MARKER: &str = "\u{1b}]hearth-display;";

/// A progress bar's state as JSON (`label`, `done`, `total`, `note`, `elapsed_s`), for the
/// terminal REPL, which draws its own bar; Jupyter front-ends never see it ([`front_end_only`]).
pub const PROGRESS_MIME: &str = "text/x-hearth-progress";

/// A sample table as JSON (`prompt`, `rows`: `tokens`, `logprobs`, `stop`), for the terminal
/// REPL, which colours tokens by logprob; Jupyter front-ends never see it.
pub const SAMPLES_MIME: &str = "text/x-hearth-samples";

/// MIME types that carry data for hearth's own front-ends, which the kernel drops before
/// publishing (notebooks keep the HTML, SVG and text forms).
pub fn front_end_only(mime: &str) -> bool {
    mime.starts_with("text/x-hearth-")
}

/// MIME type → content, with an optional display id for in-place updates.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Bundle {
    /// Content by MIME type (`text/plain`, `text/html`, `image/svg+xml`).
    pub data: BTreeMap<String, String>,
    /// Set for displays updated in place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_id: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    bundle: &'a Bundle,
    update: bool,
}

impl Bundle {
    /// A bundle with its plain-text form.
    pub fn text(text: impl Into<String>) -> Self {
        let mut b = Bundle::default();
        b.data.insert("text/plain".into(), text.into());
        b
    }

    /// Adds a MIME representation.
    pub fn with(mut self, mime: &str, content: impl Into<String>) -> Self {
        self.data.insert(mime.into(), content.into());
        self
    }

    /// The marker line (without its newline) that shows this bundle, or with `update` replaces
    /// the display shown earlier with the same `display_id`: [`MARKER`] + `{"data", "display_id",
    /// "update"}`. The front-ends parse it back with `hearth_cells::marker::Marker::parse`.
    pub fn marker_line(&self, update: bool) -> String {
        let json = serde_json::to_string(&Line { bundle: self, update }).unwrap_or_default();
        format!("{MARKER}{json}")
    }

    fn emit(&self, update: bool) {
        let mut out = std::io::stdout().lock();
        if std::env::var_os("HEARTH_DISPLAY").is_some_and(|v| v == "1") {
            let _ = writeln!(out, "{}", self.marker_line(update));
        } else if let Some(text) = self.data.get("text/plain") {
            let _ = writeln!(out, "{text}");
        }
        let _ = out.flush();
    }

    /// Shows it now (mid-cell).
    pub fn show(&self) {
        self.emit(false)
    }

    /// Replaces the display shown earlier with the same `display_id`.
    pub fn update(&self) {
        self.emit(true)
    }

    /// evcxr's hook for a cell's final value.
    pub fn evcxr_display(&self) {
        let mut out = std::io::stdout().lock();
        for (mime, content) in &self.data {
            let _ = writeln!(out, "EVCXR_BEGIN_CONTENT {mime}\n{content}\nEVCXR_END_CONTENT");
        }
        let _ = out.flush();
    }
}

/// Clears the cell's output (`wait`: when the next output arrives), like IPython's
/// `clear_output`; a terminal ignores it.
pub fn clear_output(wait: bool) {
    if std::env::var_os("HEARTH_DISPLAY").is_some_and(|v| v == "1") {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", clear_marker(wait));
        let _ = out.flush();
    }
}

/// The marker line (without its newline) of [`clear_output`]: [`MARKER`] + `{"clear", "wait"}`.
pub fn clear_marker(wait: bool) -> String {
    format!("{MARKER}{}", serde_json::json!({"clear": true, "wait": wait}))
}

/// The marker line (without its newline) that makes the running cell fail with `ename: evalue`
/// (a panic, a `?` that stopped the cell): [`MARKER`] + `{"error": {"ename", "evalue"}}`, written
/// on stderr.
pub fn error_marker(ename: &str, evalue: &str) -> String {
    format!("{MARKER}{}", serde_json::json!({"error": {"ename": ename, "evalue": evalue}}))
}

/// A line plot of one or more series, rendered to SVG with plotters.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// (name, points).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Plot {
    /// An empty plot.
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Self { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), series: Vec::new() }
    }

    /// Adds a series (non-finite points are dropped).
    pub fn series(mut self, name: &str, points: impl IntoIterator<Item = (f64, f64)>) -> Self {
        self.series.push((name.into(), points.into_iter().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()));
        self
    }

    /// The SVG document.
    pub fn svg(&self) -> String {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 360)).into_drawing_area();
            let _ = self.draw(&root);
            let _ = root.present();
        }
        svg
    }

    fn draw(
        &self,
        root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    ) -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let pts = self.series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-9);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
        chart.configure_mesh().x_desc(&self.x_label).y_desc(&self.y_label).light_line_style(WHITE.mix(0.0)).draw()?;
        for (i, (name, points)) in self.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        if self.series.len() > 1 {
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK.mix(0.3)).draw()?;
        }
        Ok(())
    }

    /// A text rendering: per series, the first, minimum and last values and a sparkline.
    pub fn text(&self) -> String {
        const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
        let mut out = format!("{}\n", self.title);
        for (name, p) in &self.series {
            let (Some(first), Some(last)) = (p.first(), p.last()) else {
                out += &format!("  {name}: (no points)\n");
                continue;
            };
            let lo = p.iter().map(|q| q.1).fold(f64::MAX, f64::min);
            let hi = p.iter().map(|q| q.1).fold(f64::MIN, f64::max);
            let step = (p.len() as f64 / 48.0).max(1.0);
            let spark: String = (0..p.len().min(48))
                .map(|i| p[((i as f64) * step) as usize].1)
                .map(|y| BARS[(((y - lo) / (hi - lo).max(1e-12)) * 7.0).round() as usize])
                .collect();
            out += &format!(
                "  {name}: {spark}  first {:.4} · min {:.4} · last {:.4} ({} points)\n",
                first.1,
                lo,
                last.1,
                p.len()
            );
        }
        out
    }

    /// SVG + text.
    pub fn bundle(&self) -> Bundle {
        Bundle::text(self.text()).with("image/svg+xml", self.svg())
    }

    /// Shows it mid-cell.
    pub fn show(&self) {
        self.bundle().show()
    }

    /// evcxr's hook.
    pub fn evcxr_display(&self) {
        self.bundle().evcxr_display()
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Samples as a table: each generated token shaded by its probability (red: unlikely, green:
/// likely), the logprob in its tooltip.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleTable {
    /// The prompt text.
    pub prompt: String,
    /// Per sample: (token texts, logprobs, stop reason).
    pub rows: Vec<(Vec<String>, Vec<f32>, String)>,
}

impl SampleTable {
    /// HTML.
    pub fn html(&self) -> String {
        let mut h = String::from("<table style=\"border-collapse:collapse;font-family:monospace\"><tr><th>#</th><th style=\"text-align:left\">");
        h += &format!("{}</th><th>mean logprob</th><th>stop</th></tr>", html_escape(&self.prompt));
        for (i, (toks, lps, stop)) in self.rows.iter().enumerate() {
            h += &format!("<tr><td>{i}</td><td style=\"text-align:left;white-space:pre-wrap\">");
            for (t, lp) in toks.iter().zip(lps) {
                let p = lp.exp().clamp(0.0, 1.0);
                h += &format!(
                    "<span title=\"logprob {lp:.3}\" style=\"background:hsl({:.0},70%,85%)\">{}</span>",
                    120.0 * p,
                    html_escape(t)
                );
            }
            let mean = if lps.is_empty() { 0.0 } else { lps.iter().sum::<f32>() / lps.len() as f32 };
            h += &format!("</td><td>{mean:.3}</td><td>{stop}</td></tr>");
        }
        h + "</table>"
    }

    /// Plain text.
    pub fn text(&self) -> String {
        let mut out = format!("prompt: {:?}\n", self.prompt);
        for (i, (toks, lps, stop)) in self.rows.iter().enumerate() {
            let mean = if lps.is_empty() { 0.0 } else { lps.iter().sum::<f32>() / lps.len() as f32 };
            out += &format!("[{i}] {:?}  (mean logprob {mean:.3}, {stop})\n", toks.concat());
        }
        out
    }

    /// HTML + text (+ the rows as JSON for the terminal).
    pub fn bundle(&self) -> Bundle {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|(tokens, logprobs, stop)| serde_json::json!({"tokens": tokens, "logprobs": logprobs, "stop": stop}))
            .collect();
        let json = serde_json::json!({"prompt": self.prompt, "rows": rows});
        Bundle::text(self.text()).with("text/html", self.html()).with(SAMPLES_MIME, json.to_string())
    }

    /// Shows it mid-cell.
    pub fn show(&self) {
        self.bundle().show()
    }

    /// evcxr's hook.
    pub fn evcxr_display(&self) {
        self.bundle().evcxr_display()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A progress bar shown once and updated in place (at most 10 times a second).
#[derive(Debug)]
pub struct Progress {
    id: String,
    label: String,
    total: u64,
    done: u64,
    note: String,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    /// Shows an empty bar.
    pub fn new(label: &str, total: u64) -> Self {
        let id = format!("hearth-progress-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::SeqCst));
        let p = Self {
            id,
            label: label.into(),
            total: total.max(1),
            done: 0,
            note: String::new(),
            started: Instant::now(),
            drawn: None,
        };
        p.bundle().show();
        p
    }

    /// Sets the count and a note (e.g. the loss), redrawing if 100 ms have passed.
    pub fn set(&mut self, done: u64, note: impl Into<String>) {
        self.done = done.min(self.total);
        self.note = note.into();
        if self.drawn.is_none_or(|t| t.elapsed().as_millis() >= 100) || self.done == self.total {
            self.drawn = Some(Instant::now());
            self.bundle().update();
        }
    }

    /// Marks it complete.
    pub fn finish(mut self) {
        let total = self.total;
        let note = std::mem::take(&mut self.note);
        self.set(total, note);
    }

    /// The bar as a bundle (HTML `<progress>` and a text bar).
    pub fn bundle(&self) -> Bundle {
        let frac = self.done as f64 / self.total as f64;
        let filled = (frac * 30.0).round() as usize;
        let secs = self.started.elapsed().as_secs_f64();
        let text = format!(
            "{} [{}{}] {}/{} {:.1}s {}",
            self.label,
            "#".repeat(filled),
            ".".repeat(30 - filled),
            self.done,
            self.total,
            secs,
            self.note
        );
        let html = format!(
            "<div style=\"font-family:monospace\">{} <progress value=\"{}\" max=\"{}\" style=\"width:240px\"></progress> {}/{} · {:.1}s · {}</div>",
            html_escape(&self.label),
            self.done,
            self.total,
            self.done,
            self.total,
            secs,
            html_escape(&self.note)
        );
        let json = serde_json::json!({"label": self.label, "done": self.done, "total": self.total, "note": self.note, "elapsed_s": secs});
        Bundle {
            display_id: Some(self.id.clone()),
            ..Bundle::text(text).with("text/html", html).with(PROGRESS_MIME, json.to_string())
        }
    }
}

impl Session {
    /// This run's loss per token by step (weighted tokens when the loss is cross-entropy).
    pub fn loss_plot(&self) -> Result<Plot> {
        let m = self.metrics()?;
        let pts = m.rows.iter().map(|r| (r.step as f64, if r.tokens > 0.0 { r.loss / r.tokens } else { r.loss }));
        Ok(Plot::new(&format!("loss · run {}", self.run_name()), "step", "loss per token").series(self.run_name(), pts))
    }

    /// Several runs' loss curves on one plot.
    pub fn compare_runs(runs: &[&Session]) -> Result<Plot> {
        let mut plot = Plot::new("loss by run", "step", "loss per token");
        for s in runs {
            let m = s.metrics()?;
            plot = plot.series(
                s.run_name(),
                m.rows.iter().map(|r| (r.step as f64, if r.tokens > 0.0 { r.loss / r.tokens } else { r.loss })),
            );
        }
        Ok(plot)
    }

    /// Samples `num_samples` continuations of `prompt` and tabulates them, token by token.
    pub fn sample_table(&self, prompt: &str, num_samples: usize, params: SamplingParams) -> Result<SampleTable> {
        let out = self.sample(&SampleInput {
            prompt: self.tokenize(prompt)?,
            num_samples,
            sampling_params: params,
            ..SampleInput::default()
        })?;
        let mut rows = Vec::new();
        for s in out.sequences {
            let texts = s.tokens.iter().map(|t| self.detokenize(&[*t])).collect::<Result<Vec<_>>>()?;
            let stop = match s.stop_reason {
                hearth_api::StopReason::Stop => "stop",
                hearth_api::StopReason::Length => "length",
            };
            rows.push((texts, s.logprobs, stop.to_string()));
        }
        Ok(SampleTable { prompt: prompt.into(), rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_render_svg_and_text() {
        let p = Plot::new("loss", "step", "loss")
            .series("a", (0..20).map(|i| (i as f64, 5.0 / (1.0 + i as f64))))
            .series("b", [(0.0, 4.0), (19.0, 1.0)]);
        let svg = p.svg();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline") && svg.contains("loss"),
            "{}",
            &svg[..200.min(svg.len())]
        );
        let text = p.text();
        assert!(text.contains("first 5.0000") && text.contains("last 0.2500"), "{text}");
        let b = p.bundle();
        assert!(b.data.contains_key("image/svg+xml") && b.data.contains_key("text/plain"));
    }

    #[test]
    fn sample_tables_escape_and_shade() {
        let t = SampleTable {
            prompt: "a<b".into(),
            rows: vec![(vec!["x".into(), "<".into()], vec![-0.1, -5.0], "length".into())],
        };
        let html = t.html();
        assert!(html.contains("a&lt;b") && html.contains(">&lt;</span>") && html.contains("hsl(109"), "{html}");
        assert!(t.text().contains("\"x<\""));
    }

    #[test]
    fn progress_keeps_its_display_id() {
        let mut p = Progress::new("train", 10);
        let id = p.bundle().display_id.clone();
        p.set(5, "loss 1.2");
        assert_eq!(p.bundle().display_id, id);
        assert!(p.bundle().data["text/plain"].contains("5/10"));
    }
}
