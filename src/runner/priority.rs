//! Hook priorities, with mmcv's names and values: lower runs first.

use std::fmt;

/// When a hook runs relative to the others at the same stage: lower first; equal
/// priorities run in registration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub u8);

impl Priority {
    /// 0: runs before every other priority.
    pub const HIGHEST: Priority = Priority(0);
    /// 10, e.g. the learning-rate updater.
    pub const VERY_HIGH: Priority = Priority(10);
    /// 30, e.g. the NaN guard.
    pub const HIGH: Priority = Priority(30);
    /// 40, e.g. the optimizer hook.
    pub const ABOVE_NORMAL: Priority = Priority(40);
    /// 50, e.g. the checkpoint hook; the default of [`Hook::priority`](super::Hook::priority).
    pub const NORMAL: Priority = Priority(50);
    /// 60.
    pub const BELOW_NORMAL: Priority = Priority(60);
    /// 70, e.g. the iteration timer and the eval hook.
    pub const LOW: Priority = Priority(70);
    /// 90, e.g. the logger hooks.
    pub const VERY_LOW: Priority = Priority(90);
    /// 100: runs after every other priority.
    pub const LOWEST: Priority = Priority(100);

    const NAMED: [(&'static str, Priority); 9] = [
        ("HIGHEST", Priority::HIGHEST),
        ("VERY_HIGH", Priority::VERY_HIGH),
        ("HIGH", Priority::HIGH),
        ("ABOVE_NORMAL", Priority::ABOVE_NORMAL),
        ("NORMAL", Priority::NORMAL),
        ("BELOW_NORMAL", Priority::BELOW_NORMAL),
        ("LOW", Priority::LOW),
        ("VERY_LOW", Priority::VERY_LOW),
        ("LOWEST", Priority::LOWEST),
    ];

    /// mmcv's name of this value (`NORMAL`), or `None` for an unnamed value such as 49.
    pub fn name(self) -> Option<&'static str> {
        Self::NAMED
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
    }

    /// The priority called `name` (case-insensitive), e.g. `"very_high"`.
    pub fn from_name(name: &str) -> Option<Priority> {
        Self::NAMED
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, p)| *p)
    }
}

impl fmt::Display for Priority {
    /// `VERY_HIGH` for named values, the number otherwise (as mmcv prints them).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.pad(n),
            None => f.pad(&self.0.to_string()),
        }
    }
}
