//! A zero-copy MessagePack token reader over a byte slice.
//!
//! Every decoder in this crate walks the input with this reader: it classifies each
//! marker with [`rmp::Marker`] and hands back a [`Token`] whose strings, binaries and
//! extension payloads borrow from the input, so decoding builds no value tree and copies
//! nothing it does not keep. Containers are returned as their element count only; the
//! caller either walks the elements or [`Reader::skip_children`] them. Lengths read
//! from the input are checked against the bytes actually left before anything is
//! sliced, and nothing here allocates, so a hostile length costs nothing.

use std::fmt;

use rmp::Marker;

/// The input is not well-formed MessagePack: it ends inside a value, or holds the
/// reserved marker `0xc1`. Callers turn this into `bad_frame`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// One MessagePack value header, with the payload of scalar values.
///
/// Integers are normalised: every non-negative integer, whatever its wire width or
/// signedness, is `UInt`; only negative values are `Int`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Token<'a> {
    Nil,
    Bool(bool),
    UInt(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    /// An array of this many elements (not yet read).
    Array(u32),
    /// A map of this many key/value pairs (not yet read).
    Map(u32),
    /// An extension value: type and payload.
    Ext(i8, &'a [u8]),
}

impl<'a> Token<'a> {
    /// The value as a float, for fields where integers stand in for floats.
    #[inline]
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match *self {
            Token::F64(v) => Some(v),
            Token::F32(v) => Some(f64::from(v)),
            Token::UInt(v) => Some(v as f64),
            Token::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The string, when this is a string holding valid UTF-8.
    #[inline]
    pub(crate) fn as_str(&self) -> Option<&'a str> {
        match *self {
            Token::Str(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// Shows a wire value the way a rejection message names it: numbers and short
/// strings literally, everything else by kind and size.
impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Token::Nil => f.write_str("nil"),
            Token::Bool(b) => write!(f, "{b}"),
            Token::UInt(v) => write!(f, "{v}"),
            Token::Int(v) => write!(f, "{v}"),
            Token::F32(v) => fmt_float(f, f64::from(v), &v),
            Token::F64(v) => fmt_float(f, v, &v),
            Token::Str(b) => match std::str::from_utf8(b) {
                Ok(s) if s.chars().count() <= 40 => write!(f, "{s:?}"),
                Ok(s) => {
                    let head: String = s.chars().take(40).collect();
                    write!(f, "{head:?}… ({} bytes)", b.len())
                }
                Err(_) => write!(f, "a string of {} bytes that is not valid UTF-8", b.len()),
            },
            Token::Bin(b) => write!(f, "binary of {} bytes", b.len()),
            Token::Array(n) => write!(f, "an array of {n} elements"),
            Token::Map(n) => write!(f, "a map of {n} entries"),
            Token::Ext(t, b) => write!(f, "extension type {t} of {} bytes", b.len()),
        }
    }
}

/// Writes a float in its shortest round-trip form, with an exponent when plain
/// notation would run to dozens of digits (`1e300`, not 301 digits).
pub(crate) fn fmt_float<T: fmt::Display + fmt::LowerExp>(
    f: &mut impl fmt::Write,
    magnitude: f64,
    v: &T,
) -> fmt::Result {
    let a = magnitude.abs();
    if a.is_finite() && a != 0.0 && !(1e-6..1e16).contains(&a) {
        write!(f, "{v:e}")
    } else {
        write!(f, "{v}")
    }
}

/// A cursor over a MessagePack byte slice.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    #[inline]
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Offset of the next unread byte.
    #[inline]
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Moves back (or forward) to an offset previously returned by [`Reader::pos`].
    #[inline]
    pub(crate) fn set_pos(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    /// Bytes not yet read.
    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.remaining() {
            return Err(Malformed);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let s = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, Malformed> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(Malformed),
        }
    }

    #[inline]
    fn u16(&mut self) -> Result<u16, Malformed> {
        self.array().map(u16::from_be_bytes)
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_be_bytes)
    }

    #[inline]
    fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_be_bytes)
    }

    #[inline]
    fn ext(&mut self, len: usize) -> Result<Token<'a>, Malformed> {
        let ty = self.u8()? as i8;
        let data = self.take(len)?;
        Ok(Token::Ext(ty, data))
    }

    /// Reads the next value header (and the payload of a scalar). Always inlined:
    /// returning the token through memory from an out-of-line call costs a
    /// store-forwarding stall per field on the hot path.
    #[inline(always)]
    pub(crate) fn next(&mut self) -> Result<Token<'a>, Malformed> {
        let m = Marker::from_u8(self.u8()?);
        Ok(match m {
            Marker::FixPos(v) => Token::UInt(u64::from(v)),
            Marker::FixNeg(v) => Token::Int(i64::from(v)),
            Marker::Null => Token::Nil,
            Marker::True => Token::Bool(true),
            Marker::False => Token::Bool(false),
            Marker::U8 => Token::UInt(u64::from(self.u8()?)),
            Marker::U16 => Token::UInt(u64::from(self.u16()?)),
            Marker::U32 => Token::UInt(u64::from(self.u32()?)),
            Marker::U64 => Token::UInt(self.u64()?),
            Marker::I8 => int(i64::from(self.u8()? as i8)),
            Marker::I16 => int(i64::from(self.u16()? as i16)),
            Marker::I32 => int(i64::from(self.u32()? as i32)),
            Marker::I64 => int(self.u64()? as i64),
            Marker::F32 => Token::F32(f32::from_bits(self.u32()?)),
            Marker::F64 => Token::F64(f64::from_bits(self.u64()?)),
            Marker::FixStr(n) => Token::Str(self.take(usize::from(n))?),
            Marker::Str8 => {
                let n = self.u8()?;
                Token::Str(self.take(usize::from(n))?)
            }
            Marker::Str16 => {
                let n = self.u16()?;
                Token::Str(self.take(usize::from(n))?)
            }
            Marker::Str32 => {
                let n = self.u32()?;
                Token::Str(self.take(n as usize)?)
            }
            Marker::Bin8 => {
                let n = self.u8()?;
                Token::Bin(self.take(usize::from(n))?)
            }
            Marker::Bin16 => {
                let n = self.u16()?;
                Token::Bin(self.take(usize::from(n))?)
            }
            Marker::Bin32 => {
                let n = self.u32()?;
                Token::Bin(self.take(n as usize)?)
            }
            Marker::FixArray(n) => Token::Array(u32::from(n)),
            Marker::Array16 => Token::Array(u32::from(self.u16()?)),
            Marker::Array32 => Token::Array(self.u32()?),
            Marker::FixMap(n) => Token::Map(u32::from(n)),
            Marker::Map16 => Token::Map(u32::from(self.u16()?)),
            Marker::Map32 => Token::Map(self.u32()?),
            Marker::FixExt1 => self.ext(1)?,
            Marker::FixExt2 => self.ext(2)?,
            Marker::FixExt4 => self.ext(4)?,
            Marker::FixExt8 => self.ext(8)?,
            Marker::FixExt16 => self.ext(16)?,
            Marker::Ext8 => {
                let n = self.u8()?;
                self.ext(usize::from(n))?
            }
            Marker::Ext16 => {
                let n = self.u16()?;
                self.ext(usize::from(n))?
            }
            Marker::Ext32 => {
                let n = self.u32()?;
                self.ext(n as usize)?
            }
            Marker::Reserved => return Err(Malformed),
        })
    }

    /// Skips the elements of a container whose header `tok` was just read; a no-op
    /// for scalars. Iterative, so nesting depth costs no stack.
    pub(crate) fn skip_children(&mut self, tok: Token<'_>) -> Result<(), Malformed> {
        let pending = match tok {
            Token::Array(n) => u64::from(n),
            Token::Map(n) => 2 * u64::from(n),
            _ => return Ok(()),
        };
        self.skip_values(pending)
    }

    /// Skips `count` complete values.
    pub(crate) fn skip_values(&mut self, count: u64) -> Result<(), Malformed> {
        let mut pending = count;
        while pending > 0 {
            // Every value takes at least one byte: a count beyond the input is malformed
            // and is refused without walking it.
            if pending > self.remaining() as u64 {
                return Err(Malformed);
            }
            pending -= 1;
            match self.next()? {
                Token::Array(n) => pending += u64::from(n),
                Token::Map(n) => pending += 2 * u64::from(n),
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads one value header and skips its children: the token of a whole value.
    #[inline]
    pub(crate) fn value(&mut self) -> Result<Token<'a>, Malformed> {
        let t = self.next()?;
        self.skip_children(t)?;
        Ok(t)
    }
}

#[inline]
fn int(v: i64) -> Token<'static> {
    if v >= 0 {
        Token::UInt(v as u64)
    } else {
        Token::Int(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_normalised() {
        // i8 5, i64 -3, u16 300, negative fixint -1
        let buf = [
            0xd0, 5, 0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfd, 0xcd, 1, 44, 0xff,
        ];
        let mut r = Reader::new(&buf);
        assert_eq!(r.next(), Ok(Token::UInt(5)));
        assert_eq!(r.next(), Ok(Token::Int(-3)));
        assert_eq!(r.next(), Ok(Token::UInt(300)));
        assert_eq!(r.next(), Ok(Token::Int(-1)));
        assert_eq!(r.next(), Err(Malformed));
    }

    #[test]
    fn huge_claimed_lengths_fail_fast() {
        // array32 claiming 2^32-1 elements in a 5-byte input
        let buf = [0xdd, 0xff, 0xff, 0xff, 0xff];
        let mut r = Reader::new(&buf);
        let t = r.next().unwrap();
        assert_eq!(t, Token::Array(u32::MAX));
        assert_eq!(r.skip_children(t), Err(Malformed));
        // str32 claiming 4 GiB
        let mut r = Reader::new(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a']);
        assert_eq!(r.next(), Err(Malformed));
    }

    #[test]
    fn skip_walks_nested_values() {
        // [ {"a": [1, 2]}, "x" ] then 7
        let buf = [0x92, 0x81, 0xa1, b'a', 0x92, 1, 2, 0xa1, b'x', 7];
        let mut r = Reader::new(&buf);
        let t = r.value().unwrap();
        assert_eq!(t, Token::Array(2));
        assert_eq!(r.next(), Ok(Token::UInt(7)));
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn reserved_marker_is_malformed() {
        assert_eq!(Reader::new(&[0xc1]).next(), Err(Malformed));
    }
}
