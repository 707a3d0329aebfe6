//! The compact binary encoding shared by tree nodes and commits: LEB128 varints, length-
//! prefixed strings, raw 32-byte ids. Every read is bounds-checked; decoders never allocate
//! more than the input could describe.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {reason}")]
pub struct DecodeError {
    /// What was being decoded ("tree node", "commit", ...).
    pub what: &'static str,
    /// What was wrong.
    pub reason: String,
}

/// Appends encoded values to a buffer.
#[derive(Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// One raw byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// An unsigned LEB128 varint (shortest form).
    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    /// A signed integer, zigzag-mapped then as a varint.
    pub fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    /// A varint length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    /// Bytes as they are (fixed-size fields such as ids).
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
}

/// Reads encoded values from a slice.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `data`; `what` names the object in errors.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, pos: 0, what }
    }

    /// A decode error at the current position.
    pub fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError { what: self.what, reason: format!("{} at byte {}", reason.into(), self.pos) }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// One raw byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.data.get(self.pos).ok_or_else(|| self.err("unexpected end"))?;
        self.pos += 1;
        Ok(b)
    }

    /// An unsigned varint; overlong and non-minimal forms are errors.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let part = (b & 0x7f) as u64;
            if shift == 63 && part > 1 {
                return Err(self.err("varint overflows 64 bits"));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                // Only the shortest form is valid: one value, one encoding, one id.
                if shift > 0 && b == 0 {
                    return Err(self.err("non-minimal varint"));
                }
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    /// A varint that must fit `max`.
    pub fn bounded(&mut self, max: u64, field: &str) -> Result<u64, DecodeError> {
        let v = self.varint()?;
        if v > max {
            return Err(self.err(format!("{field} = {v} exceeds {max}")));
        }
        Ok(v)
    }

    /// A zigzag-mapped signed integer.
    pub fn zigzag(&mut self) -> Result<i64, DecodeError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// The next `n` bytes as they are.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.err(format!("need {n} bytes, {} left", self.remaining())));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A raw 32-byte id.
    pub fn id32(&mut self) -> Result<[u8; 32], DecodeError> {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.raw(32)?);
        Ok(out)
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, max: usize, field: &str) -> Result<&'a str, DecodeError> {
        let len = self.bounded(max as u64, field)? as usize;
        let raw = self.raw(len)?;
        std::str::from_utf8(raw).map_err(|_| self.err(format!("{field} is not UTF-8")))
    }

    /// Checks every byte was read (trailing bytes are an error).
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.pos != self.data.len() {
            return Err(self.err(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_roundtrip_and_reject_overflow() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut w = Writer::default();
            w.varint(v);
            let mut r = Reader::new(&w.buf, "test");
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            let mut w = Writer::default();
            w.zigzag(v);
            assert_eq!(Reader::new(&w.buf, "t").zigzag().unwrap(), v);
        }
        let mut r = Reader::new(&[0xff; 11], "t");
        assert!(r.varint().is_err());
        // 0x80 0x00 would also mean 0: non-minimal forms are rejected.
        assert!(Reader::new(&[0x80, 0x00], "t").varint().is_err());
        assert!(Reader::new(&[0xc3, 0x80, 0x00], "t").varint().is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], "t");
        assert!(r.varint().is_err());
    }
}
