//! Logging: text lines and JSON lines in mmcv's `TextLoggerHook` format, and a
//! progress bar with ETA when stdout is a terminal.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use crate::progress::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::runner::{Hook, Mode, Model, Priority, Runner};

/// Averages the log buffer every `interval` iterations and writes a line such as
/// `Epoch [1][50/500]  lr: 2.000e-02, eta: 0:41:07, time: 0.412, data_time: 0.011,
/// loss_classifier: 0.3102, ..., loss: 1.0315` to the runner's log (stdout and
/// `work_dir/log.txt`) and the same values as one JSON object per line to
/// `work_dir/log.jsonl`. Validation epochs and evaluation metrics are logged at their
/// end. Priority VERY_LOW.
#[derive(Clone, Debug)]
pub struct LoggerHook {
    /// Log every this many iterations.
    pub interval: usize,
    /// Skip the incomplete interval at the end of an epoch.
    pub ignore_last: bool,
    /// Write `work_dir/log.jsonl`.
    pub json: bool,
    /// Show a progress bar when stdout is a terminal (and the log is not quiet).
    pub progress_bar: bool,
    time_sec_tot: f64,
    start_iter: usize,
    bar: Option<ProgressBar>,
}

impl LoggerHook {
    /// Log every `interval` iterations, with JSON lines and a progress bar.
    pub fn new(interval: usize) -> Self {
        LoggerHook {
            interval,
            ignore_last: true,
            json: true,
            progress_bar: true,
            time_sec_tot: 0.0,
            start_iter: 0,
            bar: None,
        }
    }

    fn json_path<M: Model>(runner: &Runner<M>) -> PathBuf {
        runner.work_path("log.jsonl")
    }

    fn log<M: Model>(&mut self, runner: &mut Runner<M>) {
        let mode = match runner.mode() {
            Mode::Train if runner.log_buffer.get("time").is_some() => "train",
            _ => "val",
        };
        let epoch = match runner.mode() {
            Mode::Train => runner.epoch() + 1,
            Mode::Val => runner.epoch(),
        };
        let by_epoch = runner.by_epoch();
        let iter = if by_epoch && runner.mode() == Mode::Train {
            runner.inner_iter() + 1
        } else {
            runner.iter() + 1
        };
        let lr = runner.current_lr();
        let output = runner.log_buffer.output.clone();
        let get = |k: &str| output.iter().find(|(n, _)| n == k).map(|(_, v)| *v);

        let mut line = if mode == "train" {
            let mut s = if by_epoch {
                format!("Epoch [{epoch}][{iter}/{}]\t", runner.train_len())
            } else {
                format!("Iter [{iter}/{}]\t", runner.max_iters())
            };
            s.push_str(&format!("lr: {}, ", sci3(lr)));
            if let Some(t) = get("time") {
                self.time_sec_tot += t * self.interval as f64;
                let done = (runner.iter() + 1).saturating_sub(self.start_iter).max(1);
                let avg = self.time_sec_tot / done as f64;
                let left = runner.max_iters().saturating_sub(runner.iter() + 1);
                s.push_str(&format!("eta: {}, ", format_duration(avg * left as f64)));
                s.push_str(&format!(
                    "time: {t:.3}, data_time: {:.3}, ",
                    get("data_time").unwrap_or(0.0)
                ));
            }
            s
        } else if by_epoch {
            format!("Epoch({mode}) [{epoch}][{}]\t", runner.inner_iter() + 1)
        } else {
            format!("Iter({mode}) [{iter}]\t")
        };
        let items: Vec<String> = output
            .iter()
            .filter(|(k, _)| k != "time" && k != "data_time")
            .map(|(k, v)| format!("{k}: {v:.4}"))
            .collect();
        line.push_str(&items.join(", "));
        runner.log.line(&line);

        if self.json {
            let mut obj = Map::new();
            obj.insert("mode".into(), json!(mode));
            obj.insert("epoch".into(), json!(epoch));
            obj.insert("iter".into(), json!(iter));
            obj.insert("lr".into(), json!(lr));
            for (k, v) in &output {
                // JSON has no NaN: a non-finite value becomes null.
                obj.insert(
                    k.clone(),
                    if v.is_finite() { json!(v) } else { Value::Null },
                );
            }
            let path = Self::json_path(runner);
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                let _ = writeln!(f, "{}", Value::Object(obj));
            }
        }
        runner.log_buffer.clear_output();
    }
}

/// `{:.3e}` as Python writes it: `2.000e-02` (sign and two digits in the exponent).
pub fn sci3(v: f64) -> String {
    let s = format!("{v:.3e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s, // NaN, inf
    }
}

/// Seconds as Python's `str(timedelta(seconds=int(s)))`: `1:02:03`, `2 days, 0:00:05`.
pub fn format_duration(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    let (d, rem) = (s / 86400, s % 86400);
    let hms = format!("{}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    match d {
        0 => hms,
        1 => format!("1 day, {hms}"),
        _ => format!("{d} days, {hms}"),
    }
}

impl<M: Model> Hook<M> for LoggerHook {
    fn priority(&self) -> Priority {
        Priority::VERY_LOW
    }

    fn readout_interval(&self) -> Option<usize> {
        Some(self.interval)
    }

    fn before_run(&mut self, runner: &mut Runner<M>) -> Result<()> {
        // Loss values on a GPU are read back only when this hook logs them.
        runner.set_readout_interval(self.interval);
        self.start_iter = runner.iter();
        self.time_sec_tot = 0.0;
        if self.progress_bar && !runner.log.quiet && std::io::stdout().is_terminal() {
            let bar = ProgressBar::new(runner.max_iters() as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40.cyan/blue} {pos}/{len} iters  {elapsed_precise} elapsed, eta {eta_precise}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(runner.iter() as u64);
            bar.reset_eta();
            runner.log.set_progress_bar(Some(bar.clone()));
            self.bar = Some(bar);
        }
        Ok(())
    }

    fn after_run(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if self.bar.take().is_some() {
            runner.log.set_progress_bar(None);
        }
        Ok(())
    }

    fn before_train_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        runner.log_buffer.clear();
        Ok(())
    }

    fn before_val_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        runner.log_buffer.clear();
        Ok(())
    }

    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.set_position(runner.iter() as u64 + 1);
        }
        let due = if runner.by_epoch() {
            runner.every_n_inner_iters(self.interval)
        } else {
            runner.every_n_iters(self.interval)
        };
        if due || (runner.by_epoch() && runner.end_of_epoch() && !self.ignore_last) {
            // Normally done by the runner this iteration already (no copy then).
            runner.read_out()?;
            runner.log_buffer.average(self.interval);
        }
        if runner.log_buffer.ready {
            self.log(runner);
        }
        Ok(())
    }

    fn after_train_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        runner.read_out()?;
        if runner.log_buffer.ready {
            self.log(runner);
        }
        Ok(())
    }

    fn after_val_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        runner.log_buffer.average(0);
        self.log(runner);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_as_python_does() {
        // f'{0.02:.3e}' == '2.000e-02', f'{123.0:.3e}' == '1.230e+02'
        assert_eq!(sci3(0.02), "2.000e-02");
        assert_eq!(sci3(123.0), "1.230e+02");
        assert_eq!(sci3(1.5e-100), "1.500e-100");
        // str(timedelta(seconds=3723)) == '1:02:03'; 90000 s == '1 day, 1:00:00'
        assert_eq!(format_duration(3723.9), "1:02:03");
        assert_eq!(format_duration(90000.0), "1 day, 1:00:00");
        assert_eq!(format_duration(2.0 * 86400.0 + 5.0), "2 days, 0:00:05");
    }
}
