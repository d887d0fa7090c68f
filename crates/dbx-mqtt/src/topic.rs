//! Topic patterns: `dbx/{org_code}/{aircraft}/telemetry` names where the fleet publishes
//! (the organization and the aircraft are topic levels, so the broker's ACL decides who
//! may publish for whom), and `dbx/{org_code}/rejected` where rejection notices go.
//!
//! A placeholder is a whole level. The subscription filter puts `+` in their place; an
//! incoming topic matches when it has the same levels with the literals equal, and the
//! placeholder levels are read from it.

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Org,
    Aircraft,
}

fn parse_levels(pattern: &str) -> Result<Vec<Level>, String> {
    if pattern.is_empty() {
        return Err("is empty".into());
    }
    if pattern.starts_with('$') {
        return Err(format!(
            "= {pattern:?} starts with '$', which MQTT reserves for the broker"
        ));
    }
    pattern
        .split('/')
        .map(|l| match l {
            "{org_code}" => Ok(Level::Org),
            "{aircraft}" => Ok(Level::Aircraft),
            _ if l.contains(['{', '}', '+', '#', '\0']) => Err(format!(
                "= {pattern:?}: level {l:?} may not hold '+', '#', NUL or braces; placeholders ({{org_code}}, {{aircraft}}) must be whole levels"
            )),
            _ => Ok(Level::Literal(l.to_string())),
        })
        .collect()
}

/// Where telemetry is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
}

/// The placeholder values read from a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicParts<'t> {
    /// The `{org_code}` level.
    pub org_code: &'t str,
    /// The `{aircraft}` level.
    pub aircraft: &'t str,
}

impl TopicPattern {
    /// Parses a pattern holding `{org_code}` and `{aircraft}` once each, as whole levels.
    pub fn parse(pattern: &str) -> Result<TopicPattern, String> {
        let levels = parse_levels(pattern)?;
        for (p, name) in [(Level::Org, "{org_code}"), (Level::Aircraft, "{aircraft}")] {
            let n = levels.iter().filter(|l| **l == p).count();
            if n != 1 {
                return Err(format!(
                    "= {pattern:?} must hold the level {name} exactly once (it holds it {n} times)"
                ));
            }
        }
        Ok(TopicPattern { levels })
    }

    /// The subscription filter: `+` for each placeholder.
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Org | Level::Aircraft => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The organization code and aircraft a topic names, when it matches the pattern.
    pub fn parts<'t>(&self, topic: &'t str) -> Option<TopicParts<'t>> {
        let mut org = None;
        let mut aircraft = None;
        let mut levels = topic.split('/');
        for want in &self.levels {
            let got = levels.next()?;
            match want {
                Level::Literal(s) if s == got => {}
                Level::Literal(_) => return None,
                Level::Org => org = Some(got),
                Level::Aircraft => aircraft = Some(got),
            }
        }
        if levels.next().is_some() {
            return None;
        }
        Some(TopicParts {
            org_code: org?,
            aircraft: aircraft?,
        })
    }
}

/// Where rejection notices go: literals, and optionally `{org_code}` / `{aircraft}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterTopic {
    levels: Vec<Level>,
}

impl DeadLetterTopic {
    /// Parses a dead-letter pattern.
    pub fn parse(pattern: &str) -> Result<DeadLetterTopic, String> {
        Ok(DeadLetterTopic {
            levels: parse_levels(pattern)?,
        })
    }

    /// The topic for a message rejected under `parts`; `None` when the pattern needs a
    /// level that is unknown (the message's topic did not match the telemetry pattern).
    pub fn render(&self, parts: Option<TopicParts<'_>>) -> Option<String> {
        let mut out = Vec::with_capacity(self.levels.len());
        for l in &self.levels {
            out.push(match l {
                Level::Literal(s) => s.as_str(),
                Level::Org => parts?.org_code,
                Level::Aircraft => parts?.aircraft,
            });
        }
        Some(out.join("/"))
    }

    /// True when some notice topic could also match the telemetry pattern (dbx would
    /// then receive its own notices).
    pub fn may_match(&self, telemetry: &TopicPattern) -> bool {
        self.levels.len() == telemetry.levels.len()
            && self
                .levels
                .iter()
                .zip(&telemetry.levels)
                .all(|pair| match pair {
                    (Level::Literal(a), Level::Literal(b)) => a == b,
                    _ => true,
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pattern() {
        let p = TopicPattern::parse("dbx/{org_code}/{aircraft}/telemetry").unwrap();
        assert_eq!(p.filter(), "dbx/+/+/telemetry");
        assert_eq!(
            p.parts("dbx/ACME/N100AC/telemetry"),
            Some(TopicParts {
                org_code: "ACME",
                aircraft: "N100AC"
            })
        );
        for no in [
            "dbx/ACME/N100AC",
            "dbx/ACME/N100AC/telemetry/x",
            "xdb/ACME/N100AC/telemetry",
            "dbx/ACME/N100AC/rejected",
        ] {
            assert_eq!(p.parts(no), None, "{no}");
        }
    }

    #[test]
    fn other_orders_and_bad_patterns() {
        let p = TopicPattern::parse("fleet/{aircraft}/{org_code}").unwrap();
        assert_eq!(p.filter(), "fleet/+/+");
        assert_eq!(p.parts("fleet/N1/ACME").unwrap().org_code, "ACME");
        for bad in [
            "",
            "dbx/{org_code}",
            "dbx/{org_code}/{aircraft}/{aircraft}",
            "dbx/+/{org_code}/{aircraft}",
            "dbx/{org_code}x/{aircraft}",
            "$SYS/{org_code}/{aircraft}",
        ] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dead_letter_topics() {
        let p = TopicPattern::parse("dbx/{org_code}/{aircraft}/telemetry").unwrap();
        let d = DeadLetterTopic::parse("dbx/{org_code}/rejected").unwrap();
        assert!(!d.may_match(&p));
        let parts = p.parts("dbx/ACME/N1/telemetry");
        assert_eq!(d.render(parts).as_deref(), Some("dbx/ACME/rejected"));
        assert_eq!(d.render(None), None);
        let global = DeadLetterTopic::parse("ops/dbx/rejected").unwrap();
        assert_eq!(global.render(None).as_deref(), Some("ops/dbx/rejected"));
        assert!(
            DeadLetterTopic::parse("dbx/{org_code}/{aircraft}/telemetry")
                .unwrap()
                .may_match(&p)
        );
        assert!(DeadLetterTopic::parse("dbx/x/y/{aircraft}")
            .unwrap()
            .may_match(&p));
    }
}
