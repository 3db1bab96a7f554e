//! The `troops` Python module, as deploy.py sees it.
