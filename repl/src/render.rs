//! The terminal face of hearth's displays: what a cell prints (stdout, stderr, the displays of
//! its marker lines, the final value) rendered for a terminal or, when output is a pipe,
//! as plain deterministic text with no escape codes.
//!
//! - progress bars ([`hearth::display::PROGRESS_MIME`]) redraw in place with indicatif on a
//!   terminal; a pipe gets only each bar's final line, without timings;
//! - sample tables ([`hearth::display::SAMPLES_MIME`]) colour each token by its probability;
//! - plots (`image/svg+xml`) are shown inline when the terminal speaks an image protocol, else as
//!   a text plot and the path of a PNG saved under `$HEARTH_HOME/plots/`.

use crate::image::{self, Protocol};
use hearth::display::{PROGRESS_MIME, SAMPLES_MIME};
use hearth_cells::evaluator::CellError;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;

/// How output is rendered.
pub struct Terminal {
    /// stdout is a terminal: progress redraws, colours, images.
    pub interactive: bool,
    /// stderr was a terminal at start (the REPL later routes fd 2 through a pipe).
    pub stderr_tty: bool,
    color: bool,
    images: Protocol,
    plots_dir: PathBuf,
    /// This cell's bars (a new set per cell, so indicatif's line bookkeeping starts afresh).
    multi: Mutex<Option<MultiProgress>>,
    /// Bars by display id, with the last state seen (for the pipe's final line).
    bars: Mutex<HashMap<String, (Option<ProgressBar>, serde_json::Value)>>,
    /// One writer at a time, so lines from the cell's two streams never interleave mid-line.
    lock: Mutex<()>,
}

const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const GREEN: &str = "\x1b[32m";
const DIM: &str = "\x1b[2m";
const BOLD_RED: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

impl Terminal {
    /// Decides colour and images for this process's stdout (`color`: `None` = auto, which
    /// honours `NO_COLOR`).
    pub fn new(color: Option<bool>, images: Option<Protocol>, plots_dir: PathBuf) -> Terminal {
        let interactive = std::io::stdout().is_terminal();
        let color = color.unwrap_or(interactive && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()));
        Terminal {
            interactive,
            stderr_tty: std::io::stderr().is_terminal(),
            color,
            images: image::detect(images),
            plots_dir,
            multi: Mutex::new(None),
            bars: Mutex::new(HashMap::new()),
            lock: Mutex::new(()),
        }
    }

    fn write(&self, to_stderr: bool, bytes: &[u8]) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let write = || {
            if to_stderr {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(bytes);
                let _ = e.flush();
            } else {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(bytes);
                let _ = o.flush();
            }
        };
        // bars on screen are lifted out of the way and drawn again below
        let multi = self.multi.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match multi {
            Some(m) => m.suspend(write),
            None => write(),
        }
    }

    /// A line for stdout.
    pub fn out(&self, line: &str) {
        self.write(false, format!("{line}\n").as_bytes());
    }

    /// A note from hearth itself (dimmed on a terminal), on stderr.
    pub fn note(&self, line: &str) {
        let text = if self.color && self.stderr_tty { format!("{DIM}{line}{RESET}\n") } else { format!("{line}\n") };
        self.write(true, text.as_bytes());
    }

    /// A line of the cell's stdout.
    pub fn child_stdout(&self, line: &str) {
        self.out(line);
    }

    /// A line of the cell's stderr.
    pub fn child_stderr(&self, line: &str) {
        self.write(true, format!("{line}\n").as_bytes());
    }

    /// Shows a MIME bundle: a cell's final value, a magic's answer, or a display.
    pub fn show(&self, data: &BTreeMap<String, String>, display_id: Option<&str>, update: bool) {
        if let (Some(json), Some(id)) = (data.get(PROGRESS_MIME), display_id) {
            if let Ok(state) = serde_json::from_str::<serde_json::Value>(json) {
                self.progress(id, state, update);
                return;
            }
        }
        if let Some(json) = data.get(SAMPLES_MIME).filter(|_| self.color) {
            if let Ok(table) = serde_json::from_str::<serde_json::Value>(json) {
                self.out(self.samples(&table).trim_end());
                return;
            }
        }
        if let Some(svg) = data.get("image/svg+xml") {
            self.plot(svg, data.get("text/plain").map_or("", String::as_str));
            return;
        }
        if let Some(text) = data.get("text/plain") {
            self.out(text.trim_end_matches('\n'));
        }
    }

    fn progress(&self, id: &str, state: serde_json::Value, update: bool) {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        let done = state["done"].as_u64().unwrap_or(0);
        let total = state["total"].as_u64().unwrap_or(1);
        let note = state["note"].as_str().unwrap_or_default().to_string();
        if !update || !bars.contains_key(id) {
            let bar = self.interactive.then(|| {
                let multi = self
                    .multi
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()))
                    .clone();
                let bar = multi.add(ProgressBar::new(total));
                let style =
                    ProgressStyle::with_template("{prefix} [{bar:30.green/white}] {pos}/{len} {elapsed:.dim} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(state["label"].as_str().unwrap_or_default().to_string());
                bar
            });
            bars.insert(id.to_string(), (bar, state.clone()));
        }
        let Some((bar, last)) = bars.get_mut(id) else {
            return;
        };
        *last = state.clone();
        if let Some(bar) = bar {
            bar.set_position(done);
            bar.set_message(note.clone());
        }
        if done >= total {
            let (bar, state) = bars.remove(id).unwrap_or((None, state));
            drop(bars);
            match bar {
                Some(bar) => bar.finish(),
                None => self.out(&final_line(&state)),
            }
        }
    }

    /// Ends every bar still open (the cell finished or failed without completing them); a pipe
    /// gets the last state of those that moved. A later update starts a new bar.
    pub fn end_cell(&self) {
        let open: Vec<(Option<ProgressBar>, serde_json::Value)> =
            self.bars.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, b)| b).collect();
        for (bar, state) in open {
            match bar {
                Some(bar) => bar.abandon(),
                None if state["done"].as_u64().unwrap_or(0) > 0 => self.out(&final_line(&state)),
                None => {}
            }
        }
        // indicatif leaves the cursor at the end of its last line: step past it, or the prompt
        // would be drawn over the finished bar (bars draw on stdout: fd 2 is the REPL's pipe
        // for cargo's lines, see `Front::route_stderr`)
        if self.multi.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
            self.write(false, b"\n");
        }
    }

    fn samples(&self, table: &serde_json::Value) -> String {
        let mut out = format!("prompt: {:?}\n", table["prompt"].as_str().unwrap_or_default());
        for (i, row) in table["rows"].as_array().into_iter().flatten().enumerate() {
            let tokens: Vec<&str> =
                row["tokens"].as_array().into_iter().flatten().map(|t| t.as_str().unwrap_or_default()).collect();
            let lps: Vec<f64> =
                row["logprobs"].as_array().into_iter().flatten().map(|l| l.as_f64().unwrap_or(0.0)).collect();
            out += &format!("[{i}] ");
            for (t, lp) in tokens.iter().zip(&lps) {
                let p = lp.exp();
                let colour = if p >= 0.5 {
                    GREEN
                } else if p >= 0.1 {
                    YELLOW
                } else {
                    RED
                };
                // control characters shown escaped, so a token cannot move the cursor
                let shown: String = t
                    .chars()
                    .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
                    .collect();
                out += &format!("{colour}{shown}{RESET}");
            }
            let mean = if lps.is_empty() { 0.0 } else { lps.iter().sum::<f64>() / lps.len() as f64 };
            out += &format!("  {DIM}(mean logprob {mean:.3}, {}){RESET}\n", row["stop"].as_str().unwrap_or_default());
        }
        out + &format!("{DIM}colour: {GREEN}p ≥ 0.5{RESET}{DIM} · {YELLOW}p ≥ 0.1{RESET}{DIM} · {RED}less{RESET}")
    }

    fn plot(&self, svg: &str, text: &str) {
        let raster = match image::rasterize(svg) {
            Ok(r) => r,
            Err(e) => {
                self.out(text.trim_end());
                self.note(&format!("hearth: could not render the plot: {e}"));
                return;
            }
        };
        if self.interactive && self.images != Protocol::None {
            let mut bytes = image::encode(&raster, self.images);
            bytes.push(b'\n');
            self.write(false, &bytes);
            return;
        }
        self.out(text.trim_end());
        match self.save_png(&raster) {
            Ok(path) => self.out(&format!("(plot saved as {})", path.display())),
            Err(e) => self.note(&format!("hearth: could not save the plot: {e}")),
        }
    }

    /// Saves under a name taken from the content, so the same plot gets the same file.
    fn save_png(&self, raster: &image::Raster) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.plots_dir)?;
        let hash = raster
            .png()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
        let path = self.plots_dir.join(format!("plot-{hash:016x}.png"));
        let tmp = path.with_extension("png.tmp");
        std::fs::write(&tmp, raster.png())?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// A cell's error, on stderr (red on a terminal).
    pub fn error(&self, e: &CellError) {
        let color = self.color && self.stderr_tty;
        // compiler diagnostics are complete in their rendered form; other errors are one line
        let text = if e.traceback.is_empty() {
            if color {
                format!("{BOLD_RED}{}{RESET}: {}\n", e.ename, e.evalue)
            } else {
                format!("{}: {}\n", e.ename, e.evalue)
            }
        } else {
            e.traceback.iter().map(|t| format!("{}\n", t.trim_end())).collect()
        };
        self.write(true, text.as_bytes());
    }
}

/// A bar's last state as one deterministic line (no timings): `train: 30/30 loss 0.41`.
fn final_line(state: &serde_json::Value) -> String {
    let note = state["note"].as_str().unwrap_or_default();
    let line = format!(
        "{}: {}/{}",
        state["label"].as_str().unwrap_or_default(),
        state["done"].as_u64().unwrap_or(0),
        state["total"].as_u64().unwrap_or(0)
    );
    if note.is_empty() {
        line
    } else {
        format!("{line} {note}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_coloured_by_probability_and_escaped() {
        let t = Terminal::new(Some(true), Some(Protocol::None), std::env::temp_dir());
        let table = serde_json::json!({"prompt": "2+2=", "rows": [{"tokens": ["4", "\u{1b}[2J"], "logprobs": [-0.1, -4.0], "stop": "length"}]});
        let s = t.samples(&table);
        assert!(s.contains(&format!("{GREEN}4{RESET}")), "{s:?}");
        assert!(s.contains(&format!("{RED}\\u{{1b}}[2J{RESET}")), "a raw escape must not reach the terminal: {s:?}");
    }

    #[test]
    fn final_lines_have_no_timings() {
        let state =
            serde_json::json!({"label": "train", "done": 30, "total": 30, "note": "loss 0.41", "elapsed_s": 3.2});
        assert_eq!(final_line(&state), "train: 30/30 loss 0.41");
    }
}
