//! The deploy pipeline: checkouts, venvs, failures and retries.
