//! Magics: instant commands answered by the front-end itself (no compile), from one table that
//! the kernel and the REPL share and that `:help` is generated from.

use hearth::{Bundle, CheckpointKind, SamplingParams, Session};

/// One magic.
pub struct Magic {
    /// `:name`.
    pub name: &'static str,
    /// Argument synopsis.
    pub args: &'static str,
    /// One line of help.
    pub help: &'static str,
    run: fn(&Session, &str) -> Result<Bundle, String>,
}

/// Every magic, in `:help` order.
pub const MAGICS: &[Magic] = &[
    Magic { name: "status", args: "", help: "the server: model, device, memory, runs, cost", run: status },
    Magic {
        name: "runs",
        args: "[all]",
        help: "your runs with their step and newest checkpoint (the admin: every user's)",
        run: runs,
    },
    Magic {
        name: "usage",
        args: "",
        help: "device time, tokens, runs and cost: yours (the admin: every user's)",
        run: usage,
    },
    Magic {
        name: "sample",
        args: "<prompt>",
        help: "4 samples of the prompt from the current weights, shaded by logprob",
        run: sample,
    },
    Magic { name: "plot", args: "[all]", help: "this run's loss curve (all: every run on one plot)", run: plot },
    Magic {
        name: "save",
        args: "[name]",
        help: "save a `state` checkpoint of this run (default name: step-N)",
        run: save,
    },
    Magic {
        name: "resume",
        args: "[name|path]",
        help: "load a checkpoint into this run (default: its newest)",
        run: resume,
    },
    Magic { name: "help", args: "", help: "this list", run: |_, _| Ok(help()) },
];

/// `:help`, generated from [`MAGICS`].
pub fn help() -> Bundle {
    let mut text = String::from("hearth magics (instant, no compile):\n");
    let mut html =
        String::from("<table><tr><th style=\"text-align:left\">magic</th><th style=\"text-align:left\">what</th></tr>");
    for m in MAGICS {
        let usage = if m.args.is_empty() { format!(":{}", m.name) } else { format!(":{} {}", m.name, m.args) };
        text += &format!("  {usage:<22} {}\n", m.help);
        html += &format!(
            "<tr><td><code>{}</code></td><td style=\"text-align:left\">{}</td></tr>",
            esc(&usage),
            esc(m.help)
        );
    }
    text += "Everything else is Rust, evaluated with `session` in scope (evcxr's own :commands work too).";
    Bundle::text(text).with("text/html", html + "</table>")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The magic a line names, if it is one of ours (`:dep` and other evcxr commands are not).
pub fn find(line: &str) -> Option<(&'static Magic, &str)> {
    let line = line.trim();
    // a magic is one line; a block that starts with one is several cells (see `scanner::split_typed`)
    if line.contains('\n') {
        return None;
    }
    let rest = line.strip_prefix(':')?;
    let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    MAGICS.iter().find(|m| m.name == name).map(|m| (m, args.trim()))
}

/// Runs a magic line against `session`: `None` when the line is not one of ours.
pub fn run(line: &str, session: &Session) -> Option<Result<Bundle, String>> {
    let (m, args) = find(line)?;
    Some((m.run)(session, args))
}

fn err(e: hearth::HearthError) -> String {
    e.to_string()
}

fn status(s: &Session, _: &str) -> Result<Bundle, String> {
    let i = s.info().map_err(err)?;
    let text = format!(
        "model {} ({}, {} parameters) on {} as {} · {:.0} MB resident · up {:.0} s\nruns: {} · this cell's run: {}\ncost: held {:.0} s, busy {:.0} s, ${:.4} at ${:.2}/h{}\nidle timeout {} s · autosave every {} steps",
        i.model,
        i.model_type,
        i.num_parameters,
        i.device,
        i.dtype,
        i.memory_bytes as f64 / 1e6,
        i.uptime_s,
        i.runs.iter().map(|r| format!("{} (step {})", r.id, r.step)).collect::<Vec<_>>().join(", "),
        s.run_name(),
        i.cost.held_s,
        i.cost.busy_s,
        i.cost.spent_usd,
        i.cost.hourly_rate_usd,
        i.cost.budget_usd.map(|b| format!(" of ${b:.2}")).unwrap_or_default(),
        i.idle_timeout_s,
        i.autosave_every,
    );
    Ok(Bundle::text(text))
}

fn runs(s: &Session, _: &str) -> Result<Bundle, String> {
    let runs = s.runs().map_err(err)?;
    let mut text = format!("{:<16} {:>6} {:>10}  training\n", "run", "step", "saved at");
    for r in &runs {
        let saved = r.last_checkpoint_step.map_or("-".to_string(), |s| s.to_string());
        text += &format!(
            "{:<16} {:>6} {:>10}  {}\n",
            r.id,
            r.step,
            saved,
            serde_json::to_string(&r.training).unwrap_or_default()
        );
    }
    Ok(Bundle::text(text))
}

fn usage(s: &Session, _: &str) -> Result<Bundle, String> {
    let report = s.usage().map_err(err)?;
    let mut text = format!(
        "{:<12} {:>10} {:>14} {:>14} {:>5} {:>11} {:>9}\n",
        "user", "device s", "tokens trained", "tokens sampled", "runs", "checkpoints", "cost $"
    );
    for u in &report.users {
        text += &format!(
            "{:<12} {:>10.1} {:>14} {:>14} {:>5} {:>11} {:>9.4}\n",
            u.user, u.device_seconds, u.tokens_trained, u.tokens_sampled, u.runs, u.checkpoints, u.cost_usd
        );
    }
    Ok(Bundle::text(text))
}

fn sample(s: &Session, prompt: &str) -> Result<Bundle, String> {
    if prompt.is_empty() {
        return Err("usage: :sample <prompt>".into());
    }
    let params = SamplingParams { max_tokens: 32, temperature: 0.8, ..SamplingParams::default() };
    Ok(s.sample_table(prompt, 4, params).map_err(err)?.bundle())
}

fn plot(s: &Session, args: &str) -> Result<Bundle, String> {
    if args == "all" {
        let handles: Vec<Session> = s.runs().map_err(err)?.iter().filter_map(|r| s.with_run(&r.id).ok()).collect();
        let refs: Vec<&Session> = handles.iter().collect();
        return Ok(Session::compare_runs(&refs).map_err(err)?.bundle());
    }
    Ok(s.loss_plot().map_err(err)?.bundle())
}

fn save(s: &Session, name: &str) -> Result<Bundle, String> {
    let name = if name.is_empty() {
        let step = s.runs().map_err(err)?.into_iter().find(|r| r.id == s.run_name()).map_or(0, |r| r.step);
        format!("step-{step}")
    } else {
        name.to_string()
    };
    let out = s.save_state(&name, CheckpointKind::State).map_err(err)?;
    Ok(Bundle::text(format!("saved run {} at step {} to {}", s.run_name(), out.step, out.path)))
}

fn resume(s: &Session, source: &str) -> Result<Bundle, String> {
    let source = if source.is_empty() {
        let run = s.runs().map_err(err)?.into_iter().find(|r| r.id == s.run_name()).ok_or("this run is gone")?;
        if run.last_checkpoint_step.is_none() {
            return Err(format!("run {} has no checkpoint yet; :save one first", run.id));
        }
        newest_checkpoint(s)?
    } else {
        source.to_string()
    };
    let out = s.load_state(&source).map_err(err)?;
    Ok(Bundle::text(format!(
        "run {} is at step {} again ({} from {})",
        s.run_name(),
        out.step,
        out.kind.name(),
        out.path
    )))
}

/// The newest checkpoint folder of the session's run, by modification time.
fn newest_checkpoint(s: &Session) -> Result<String, String> {
    let dir = s.home().join("runs").join(s.run_name()).join("checkpoints");
    let newest = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .ok_or_else(|| format!("no checkpoints in {}", dir.display()))?;
    Ok(newest.path().display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_magic_and_lines_parse() {
        let h = help();
        for m in MAGICS {
            assert!(h.data["text/plain"].contains(&format!(":{}", m.name)), "{}", m.name);
        }
        assert_eq!(find(":sample  the prompt ").map(|(m, a)| (m.name, a)), Some(("sample", "the prompt")));
        assert!(find(":dep serde = \"1\"").is_none(), "evcxr's commands pass through");
        assert!(find("let x = 1;").is_none());
    }
}
