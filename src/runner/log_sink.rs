//! Where the runner's text goes: stdout (printed above the progress bar when one is
//! shown) and a text file in the work_dir.

use std::io::Write;
use std::path::PathBuf;

use crate::progress::ProgressBar;

/// Text output of a run.
#[derive(Default)]
pub struct LogSink {
    /// Print nothing to stdout (the file still gets every line).
    pub quiet: bool,
    file: Option<PathBuf>,
    bar: Option<ProgressBar>,
}

impl LogSink {
    /// Append lines to `path` too (`None`: stdout only).
    pub fn set_file(&mut self, path: Option<PathBuf>) {
        self.file = path;
    }

    /// The text file lines are appended to.
    pub fn file(&self) -> Option<&PathBuf> {
        self.file.as_ref()
    }

    /// Show `bar` under the text (the logger hook sets it when stdout is a terminal).
    pub fn set_progress_bar(&mut self, bar: Option<ProgressBar>) {
        if let Some(old) = self.bar.take() {
            old.finish_and_clear();
        }
        self.bar = bar;
    }

    /// The progress bar, if one is shown.
    pub fn progress_bar(&self) -> Option<&ProgressBar> {
        self.bar.as_ref()
    }

    /// Write one line (or several, separated by newlines).
    pub fn line(&self, text: &str) {
        if !self.quiet {
            match &self.bar {
                // The bar is redrawn below the text by erasing lines; a tab would
                // move the cursor further than indicatif measures and leave stale bars.
                Some(bar) => bar.println(text.replace('\t', "  ")),
                None => println!("{text}"),
            }
        }
        if let Some(path) = &self.file {
            // Logging must not stop training: a full disk shows up at the next
            // checkpoint write, which does report its error.
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{text}");
            }
        }
    }
}
