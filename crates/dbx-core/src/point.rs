//! One telemetry point, decoded and validated, ready to be written.
//!
//! Field order and meaning follow the point table of docs/protocol.md; the column each
//! field is stored in is named in its doc comment. Optional fields are `None` when
//! the gateway left them out or sent `nil`, and become SQL NULL.

/// Number of fields a point has on the wire (the array form holds at most this many).
pub const POINT_FIELD_COUNT: usize = 21;

/// A decoded telemetry point.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Point {
    /// `ts`: microseconds since the Unix epoch (UTC). Column `ts timestamptz`.
    pub ts_micros: i64,
    /// `seq`: unique within the flight session. Column `seq bigint`.
    pub seq: i64,
    /// `lat`: degrees, −90..=90. Column `latitude double precision`.
    pub lat: Option<f64>,
    /// `lon`: degrees, −180..=180. Column `longitude double precision`.
    pub lon: Option<f64>,
    /// `alt`: metres. Column `altitude_m real`.
    pub alt: Option<f32>,
    /// `gs`: ground speed, m/s, ≥ 0. Column `ground_speed_mps real`.
    pub gs: Option<f32>,
    /// `vs`: vertical speed, m/s. Column `vertical_speed_mps real`.
    pub vs: Option<f32>,
    /// `hdg`: heading, degrees 0..=360. Column `heading_deg real`.
    pub hdg: Option<f32>,
    /// `roll`: degrees. Column `roll_deg real`.
    pub roll: Option<f32>,
    /// `pitch`: degrees. Column `pitch_deg real`.
    pub pitch: Option<f32>,
    /// `yaw`: degrees. Column `yaw_deg real`.
    pub yaw: Option<f32>,
    /// `ias`: indicated airspeed, m/s, ≥ 0. Column `airspeed_mps real`.
    pub ias: Option<f32>,
    /// `bv`: battery voltage. Column `battery_voltage real`.
    pub bv: Option<f32>,
    /// `bi`: battery current. Column `battery_current real`.
    pub bi: Option<f32>,
    /// `bp`: battery remaining, percent 0..=100. Column `battery_remaining_pct real`.
    pub bp: Option<f32>,
    /// `rpm`: motor speeds, at most 16. Column `motor_rpm real[]`.
    pub rpm: Option<Vec<f32>>,
    /// `cs`: control surface deflections, at most 16. Column `control_surfaces real[]`.
    pub cs: Option<Vec<f32>>,
    /// `fix`: GPS fix type 0..=8. Column `gps_fix smallint`.
    pub fix: Option<i16>,
    /// `sats`: satellites in view 0..=255. Column `satellites smallint`.
    pub sats: Option<i16>,
    /// `temp`: degrees Celsius. Column `temperature_c real`.
    pub temp: Option<f32>,
    /// `x` plus every unknown key of the point, as one JSON object in text form.
    /// Column `extra jsonb`; `None` when the point had neither.
    pub extra: Option<String>,
}

impl Point {
    /// A point with only the required fields set.
    pub fn new(ts_micros: i64, seq: i64) -> Self {
        Point {
            ts_micros,
            seq,
            ..Point::default()
        }
    }

    /// Latitude and longitude when both are present.
    pub fn position(&self) -> Option<(f64, f64)> {
        Some((self.lat?, self.lon?))
    }

    /// A rough upper bound of the bytes this point takes in a binary COPY stream,
    /// used by the batcher's `max_batch_bytes` accounting without encoding twice.
    pub fn approx_copy_bytes(&self) -> usize {
        // 2 (field count) + 24 fields × 4 (length words) + fixed-width payloads.
        const FIXED: usize = 2 + 24 * 4 + 16 * 3 + 8 * 4 + 4 * 13 + 2 * 2;
        let arrays = |a: &Option<Vec<f32>>| a.as_ref().map_or(0, |v| 20 + 8 * v.len());
        FIXED
            + arrays(&self.rpm)
            + arrays(&self.cs)
            + self.extra.as_ref().map_or(0, |e| 1 + e.len())
    }
}
