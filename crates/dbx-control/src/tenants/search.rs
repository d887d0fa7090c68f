//! Full-text search over the organizations' analysis reports (`dbx analyses search`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::orgs::Org;
use super::validate::validate_text;
use super::{invalid, TenantError};

/// One analysis matching a search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalysisHit {
    /// The analysis.
    pub analysis_id: Uuid,
    /// Its flight session.
    pub session_id: Option<Uuid>,
    /// Model that produced it.
    pub model_version: String,
    /// Risk level.
    pub risk_level: Option<String>,
    /// Whether an anomaly was detected.
    pub anomaly_detected: bool,
    /// When it was made.
    pub analysis_timestamp: DateTime<Utc>,
    /// `ts_rank` of the report against the query (higher is better).
    pub rank: f32,
    /// Matching fragments of the report, matches between `**`.
    pub headline: String,
}

/// The analyses of an organization whose report matches `query` (web-search syntax: words,
/// `"phrases"`, `or`, `-excluded`; English stemming), best first, at most `limit`. Uses the GIN
/// index `ml_analysis_results_report_fts`.
pub async fn search_analyses(
    client: &impl GenericClient,
    org: &Org,
    query: &str,
    limit: i64,
) -> Result<Vec<AnalysisHit>, TenantError> {
    validate_text("search text", query, 1000)?;
    if !(1..=10_000).contains(&limit) {
        return Err(invalid(
            "--limit",
            format!("{limit} must be between 1 and 10000"),
        ));
    }
    // Rank in the inner query, headline only for the rows returned (ts_headline re-parses the
    // whole document, so it must not run for every match).
    let rows = client
        .query(
            "WITH q AS (SELECT websearch_to_tsquery('english', $2) AS q),
                  best AS (
                    SELECT a.analysis_id,
                           ts_rank(to_tsvector('english'::regconfig, COALESCE(a.ai_report_content, '')), q.q) AS rank
                      FROM dbx_aviation.ml_analysis_results a, q
                     WHERE a.org_id = $1
                       AND to_tsvector('english'::regconfig, COALESCE(a.ai_report_content, '')) @@ q.q
                     ORDER BY rank DESC, a.analysis_timestamp DESC
                     LIMIT $3)
             SELECT a.analysis_id, a.session_id, a.model_version::text, a.risk_level::text,
                    a.anomaly_detected, a.analysis_timestamp, best.rank,
                    ts_headline('english', COALESCE(a.ai_report_content, ''), q.q,
                                'StartSel=**, StopSel=**, MaxWords=35, MinWords=12, MaxFragments=2, FragmentDelimiter=\" ... \"')
               FROM best JOIN dbx_aviation.ml_analysis_results a USING (analysis_id), q
              ORDER BY best.rank DESC, a.analysis_timestamp DESC",
            &[&org.org_id, &query, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AnalysisHit {
            analysis_id: r.get(0),
            session_id: r.get(1),
            model_version: r.get(2),
            risk_level: r.get(3),
            anomaly_detected: r.get(4),
            analysis_timestamp: r.get(5),
            rank: r.get(6),
            headline: r.get(7),
        })
        .collect())
}
