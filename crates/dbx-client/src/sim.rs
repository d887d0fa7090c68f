//! Plausible flights for the load generator: each simulated aircraft takes off,
//! climbs to cruise, flies a leg, descends and lands, then starts a new flight
//! (a new session). Battery drains with power, motor speeds follow the phase, and
//! control surfaces wobble. Timestamps are wall-clock time (so points always fall
//! within the daemon's accepted window), strictly increasing per flight.

use dbx_core::Point;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// Simulated seconds one point advances a flight (10 Hz telemetry).
const DT: f64 = 0.1;
/// Points in one flight: take-off, cruise, landing (≈ 10 simulated minutes).
const FLIGHT_POINTS: u64 = 6_000;

/// One aircraft flying one flight after another.
#[derive(Debug)]
pub struct FlightSim {
    /// The aircraft's registration number.
    pub registration: String,
    /// The current flight's session.
    pub session: Uuid,
    seq: u64,
    lat: f64,
    lon: f64,
    heading: f64,
    battery: f64,
    last_ts: i64,
    rng: SmallRng,
}

impl FlightSim {
    /// A new aircraft at a pseudo-random home field (deterministic per `seed`).
    pub fn new(registration: String, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        FlightSim {
            registration,
            session: Uuid::from_u128(rng.gen()),
            seq: 0,
            lat: 46.0 + rng.gen_range(0.0..3.0),
            lon: 6.0 + rng.gen_range(0.0..4.0),
            heading: rng.gen_range(0.0..360.0),
            battery: 100.0,
            last_ts: 0,
            rng,
        }
    }

    /// True when the current flight has landed: its session is complete, and the next
    /// batch starts a new one.
    pub fn landed(&self) -> bool {
        self.seq >= FLIGHT_POINTS
    }

    /// True when the current flight has sent points and not landed: a session a gateway
    /// still has to end.
    pub fn flying(&self) -> bool {
        self.seq > 0 && !self.landed()
    }

    /// The next `n` points; starts a new flight (session) when the current one lands.
    /// Returns the session the points belong to; a batch never spans two flights.
    pub fn next_batch(&mut self, n: usize, now_micros: i64) -> (Uuid, Vec<Point>) {
        if self.seq >= FLIGHT_POINTS {
            self.session = Uuid::from_u128(self.rng.gen());
            self.seq = 0;
            self.battery = 100.0;
            self.heading = self.rng.gen_range(0.0..360.0);
        }
        let n = n.min((FLIGHT_POINTS - self.seq) as usize).max(1);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.step(now_micros));
        }
        (self.session, out)
    }

    fn step(&mut self, now_micros: i64) -> Point {
        let phase = self.seq as f64 / FLIGHT_POINTS as f64;
        // Climb for the first 15 %, descend over the last 15 %, cruise between.
        let (alt, vs, gs, power) = if phase < 0.15 {
            let p = phase / 0.15;
            (
                120.0 * p,
                120.0 / (0.15 * FLIGHT_POINTS as f64 * DT),
                4.0 + 14.0 * p,
                1.0,
            )
        } else if phase > 0.85 {
            let p = (1.0 - phase) / 0.15;
            (
                120.0 * p,
                -120.0 / (0.15 * FLIGHT_POINTS as f64 * DT),
                4.0 + 14.0 * p,
                0.8,
            )
        } else {
            (
                120.0 + self.rng.gen_range(-2.0..2.0),
                self.rng.gen_range(-0.3..0.3),
                18.0,
                0.6,
            )
        };
        self.heading = (self.heading + self.rng.gen_range(-0.5..0.5)).rem_euclid(360.0);
        let d = gs * DT / 6_371_008.8;
        let h = self.heading.to_radians();
        self.lat = (self.lat + (d * h.cos()).to_degrees()).clamp(-89.0, 89.0);
        self.lon += (d * h.sin() / self.lat.to_radians().cos()).to_degrees();
        if self.lon > 180.0 {
            self.lon -= 360.0;
        }
        self.battery = (self.battery - 0.0025 * power).max(5.0);
        let rpm = 3000.0 + 3000.0 * power;
        let ts = now_micros.max(self.last_ts + 1);
        self.last_ts = ts;
        let seq = self.seq as i64;
        self.seq += 1;
        let r = &mut self.rng;
        Point {
            ts_micros: ts,
            seq,
            lat: Some(self.lat),
            lon: Some(self.lon),
            alt: Some(alt as f32),
            gs: Some(gs as f32),
            vs: Some(vs as f32),
            hdg: Some(self.heading as f32),
            roll: Some(r.gen_range(-5.0..5.0)),
            pitch: Some(r.gen_range(-3.0..3.0)),
            yaw: Some(r.gen_range(-2.0..2.0)),
            ias: Some((gs + r.gen_range(-1.0..1.0)).max(0.0) as f32),
            bv: Some((22.2 * (0.85 + 0.15 * self.battery / 100.0)) as f32),
            bi: Some((25.0 * power) as f32),
            bp: Some(self.battery as f32),
            rpm: Some(
                (0..4)
                    .map(|_| (rpm + r.gen_range(-50.0..50.0)) as f32)
                    .collect(),
            ),
            cs: Some((0..4).map(|_| r.gen_range(-0.2..0.2)).collect()),
            fix: Some(3),
            sats: Some(r.gen_range(9..17)),
            temp: Some(r.gen_range(15.0..25.0)),
            extra: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flight_climbs_cruises_lands_and_then_starts_a_new_session() {
        let mut f = FlightSim::new("N1".into(), 7);
        let first = f.session;
        let mut alts = Vec::new();
        let mut seqs = Vec::new();
        let mut last_ts = 0;
        for _ in 0..(FLIGHT_POINTS / 500) {
            let (s, pts) = f.next_batch(500, 1_000);
            assert_eq!(s, first);
            for p in pts {
                assert!(p.ts_micros > last_ts);
                last_ts = p.ts_micros;
                alts.push(p.alt.unwrap());
                seqs.push(p.seq);
            }
        }
        assert_eq!(seqs, (0..FLIGHT_POINTS as i64).collect::<Vec<_>>());
        assert!(f.landed() && !f.flying());
        let max = alts.iter().cloned().fold(0.0, f32::max);
        assert!(alts[0] < 1.0 && max > 110.0 && *alts.last().unwrap() < 2.0);
        let (next, pts) = f.next_batch(10, 2_000);
        assert_ne!(next, first);
        assert_eq!(pts[0].seq, 0);
        assert!(f.flying() && !f.landed());
    }
}
