//! The one error every configuration section returns when a value cannot work: the
//! key and why. A section's `validate` names the key within its section
//! (`max_connections`); the binary places it in its section ([`ConfigError::in_section`])
//! and adds the environment variable that set the value, when one did
//! ([`ConfigError::set_by`]), so that an operator reads one line naming exactly what to
//! change, in the file or in the environment.

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`{}: {reason}", env_hint(.env))]
pub struct ConfigError {
    /// The key: within its section as a section returns it, dotted from the top
    /// (`listener.max_connections`) once the binary has placed it.
    pub key: String,
    /// What is wrong with the value.
    pub reason: String,
    /// The environment variable that set the value, when one did.
    pub env: Option<String>,
}

fn env_hint(env: &Option<String>) -> String {
    env.as_ref()
        .map(|v| format!(" (set by environment variable {v})"))
        .unwrap_or_default()
}

impl ConfigError {
    /// `key` (within its section) cannot be used, because of `reason`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
            env: None,
        }
    }

    /// The same error with its key placed in `section` (`max_connections` in
    /// `listener` → `listener.max_connections`).
    pub fn in_section(mut self, section: &str) -> Self {
        self.key = format!("{section}.{}", self.key);
        self
    }

    /// The same error naming the environment variable that set the value.
    pub fn set_by(mut self, env: Option<String>) -> Self {
        self.env = env;
        self
    }
}

/// The environment variable that overrides a dotted key: `listener.max_connections` →
/// `DBX_LISTENER__MAX_CONNECTIONS` (a key nested deeper keeps its dots' sections).
pub fn env_var_for(key: &str) -> String {
    let (section, rest) = key.split_once('.').unwrap_or((key, ""));
    format!(
        "DBX_{}__{}",
        section.to_ascii_uppercase(),
        rest.to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_naming_key_and_source() {
        let e =
            ConfigError::new("max_connections", "must be greater than 0").in_section("listener");
        assert_eq!(
            e.to_string(),
            "config key `listener.max_connections`: must be greater than 0"
        );
        let e = e.set_by(Some(env_var_for("listener.max_connections")));
        assert_eq!(
            e.to_string(),
            "config key `listener.max_connections` (set by environment variable \
             DBX_LISTENER__MAX_CONNECTIONS): must be greater than 0"
        );
    }
}
