//! A node: where its files are and what its settings say.

use std::path::Path;

use crate::paths::Layout;
use crate::settings::{Settings, SettingsError};

pub struct Node {
    pub layout: Layout,
    pub settings: Settings,
}

impl Node {
    pub fn open(root: &Path) -> Result<Node, SettingsError> {
        let layout = Layout::new(root);
        let settings = Settings::load(&layout.settings_file())?;
        Ok(Node { layout, settings })
    }
}
