//! Where a run's output goes besides its log file and the journal: whoever is attached.

/// One line at a time, as deploy.py prints it.
pub trait Output {
    fn line(&mut self, line: &str);
}

/// Nobody attached (a timer run whose stdout is the journal already).
pub struct Discard;

impl Output for Discard {
    fn line(&mut self, _: &str) {}
}

impl<F: FnMut(&str)> Output for F {
    fn line(&mut self, line: &str) {
        self(line)
    }
}
