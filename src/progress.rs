//! The training progress bar: indicatif's with the `cli` feature, else a stand-in
//! that draws nothing and prints log lines as they come, so the runner's code is the
//! same in both builds.

#[cfg(feature = "cli")]
pub use indicatif::{ProgressBar, ProgressStyle};

#[cfg(not(feature = "cli"))]
pub use standin::{ProgressBar, ProgressStyle};

#[cfg(not(feature = "cli"))]
mod standin {
    /// A progress bar that draws nothing (built without the `cli` feature).
    #[derive(Clone, Debug, Default)]
    pub struct ProgressBar;

    /// The style of a [`ProgressBar`]; ignored.
    #[derive(Clone, Debug, Default)]
    pub struct ProgressStyle;

    impl ProgressStyle {
        /// Any template is accepted and ignored.
        pub fn with_template(_template: &str) -> Result<Self, std::convert::Infallible> {
            Ok(ProgressStyle)
        }

        /// The default style.
        pub fn default_bar() -> Self {
            ProgressStyle
        }
    }

    impl ProgressBar {
        /// A bar of `len` steps.
        pub fn new(_len: u64) -> Self {
            ProgressBar
        }
        /// Ignored.
        pub fn set_style(&self, _style: ProgressStyle) {}
        /// Ignored.
        pub fn set_position(&self, _pos: u64) {}
        /// Ignored.
        pub fn reset_eta(&self) {}
        /// Ignored.
        pub fn finish_and_clear(&self) {}
        /// Print a line (there is no bar to keep below it).
        pub fn println(&self, text: impl AsRef<str>) {
            println!("{}", text.as_ref());
        }
    }
}
