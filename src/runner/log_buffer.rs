//! mmcv's LogBuffer: the history of logged values and their running averages.

/// Values logged since the last clear, per key in first-logged order, each with its
/// count (the number of samples it stands for); `output` holds the averages the
/// logger prints, `ready` says it is due.
#[derive(Clone, Debug, Default)]
pub struct LogBuffer {
    history: Vec<(String, Vec<(f64, usize)>)>,
    /// What the logger prints next: averages, plus values set directly (eval metrics).
    pub output: Vec<(String, f64)>,
    /// Set by [`LogBuffer::average`] or by a hook that put something in `output`.
    pub ready: bool,
}

impl LogBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget the history and the output.
    pub fn clear(&mut self) {
        self.history.clear();
        self.clear_output();
    }

    /// Forget the output only.
    pub fn clear_output(&mut self) {
        self.output.clear();
        self.ready = false;
    }

    /// Append values, each standing for `count` samples.
    pub fn update(&mut self, vars: &[(String, f64)], count: usize) {
        for (k, v) in vars {
            match self.history.iter_mut().find(|(n, _)| n == k) {
                Some((_, h)) => h.push((*v, count)),
                None => self.history.push((k.clone(), vec![(*v, count)])),
            }
        }
    }

    /// Append one value.
    pub fn update_one(&mut self, key: &str, value: f64, count: usize) {
        self.update(&[(key.to_string(), value)], count);
    }

    /// Set `output` to the count-weighted average of the latest `n` values of each key
    /// (all values when `n` is 0), and mark it ready.
    pub fn average(&mut self, n: usize) {
        let mut avgs = Vec::with_capacity(self.history.len());
        for (k, h) in &self.history {
            let tail = if n == 0 || n >= h.len() {
                &h[..]
            } else {
                &h[h.len() - n..]
            };
            let (s, c) = tail
                .iter()
                .fold((0.0, 0usize), |(s, c), (v, k)| (s + v * *k as f64, c + k));
            let avg = if c == 0 { f64::NAN } else { s / c as f64 };
            avgs.push((k.clone(), avg));
        }
        for (k, avg) in avgs {
            self.set_output(&k, avg);
        }
        self.ready = true;
    }

    /// Put `value` in the output under `key` (replacing an earlier one).
    pub fn set_output(&mut self, key: &str, value: f64) {
        match self.output.iter_mut().find(|(n, _)| n == key) {
            Some((_, v)) => *v = value,
            None => self.output.push((key.to_string(), value)),
        }
    }

    /// The output value of `key`.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.output.iter().find(|(n, _)| n == key).map(|(_, v)| *v)
    }

    /// The latest logged value of `key`.
    pub fn latest(&self, key: &str) -> Option<f64> {
        self.history
            .iter()
            .find(|(n, _)| n == key)
            .and_then(|(_, h)| h.last().map(|(v, _)| *v))
    }
}
