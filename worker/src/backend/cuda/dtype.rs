#![forbid(unsafe_code)]
//! Which dtype each weight is uploaded to the device in, and the host-side conversions.
//!
//! The host model keeps every weight as `f32`, widened from the checkpoint's stored dtype.
//! Uploading those as `f32` would double the device memory (and the memory bandwidth of every
//! GEMM) of a bf16 or f16 checkpoint, so the backend uploads each tensor in the narrowest dtype
//! that holds all of its values *exactly* ([`narrowest_exact`]): this recovers the stored dtype
//! without reading the checkpoint again and never changes a value. The kernels are generated
//! per dtype ([`WeightDtype::kernel_suffix`]), and [`encode`] produces the bytes to upload.

use half::slice::HalfFloatSliceExt;

/// The dtype a weight lives in on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

/// A dtype name that is not one of `f32`, `bf16`, `f16`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("unknown weight dtype {0:?} (expected f32, bf16 or f16)")]
pub struct UnknownWeightDtype(pub String);

impl WeightDtype {
    /// Bytes per element: 4, 2, 2.
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        }
    }

    /// Suffix of the generated kernels for this dtype (`embed_rows_bf16`, ...).
    pub fn kernel_suffix(self) -> &'static str {
        self.name()
    }

    /// Lower-case name: "f32", "bf16", "f16".
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = UnknownWeightDtype;

    /// "f32", "bf16" or "f16", case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            "f16" => Ok(WeightDtype::F16),
            _ => Err(UnknownWeightDtype(s.to_string())),
        }
    }
}

/// Whether `v` is a bf16 value: its low 16 bits are zero (this keeps NaN payloads and inf).
fn is_bf16_exact(v: f32) -> bool {
    v.to_bits() & 0xFFFF == 0
}

/// Whether `v` converts to f16 and back with the same bits (finite values within the f16 range
/// and precision, subnormals included, infinities, NaNs widened from f16).
fn is_f16_exact(v: f32) -> bool {
    half::f16::from_f32(v).to_f32().to_bits() == v.to_bits()
}

/// The narrowest dtype that holds every value exactly: `Bf16` if every value is a bf16 value
/// (low 16 bits zero, which keeps NaN / inf), else `F16` if every value converts to f16 and back
/// unchanged, else `F32`. Empty -> `F32`.
///
/// A tensor whose values are all both (e.g. small integers) is `Bf16`; either would be lossless.
pub fn narrowest_exact(values: &[f32]) -> WeightDtype {
    if values.is_empty() {
        return WeightDtype::F32;
    }
    let (mut bf16, mut f16) = (true, true);
    for &v in values {
        bf16 = bf16 && is_bf16_exact(v);
        f16 = f16 && is_f16_exact(v);
        if !bf16 && !f16 {
            return WeightDtype::F32;
        }
    }
    if bf16 {
        WeightDtype::Bf16
    } else {
        WeightDtype::F16
    }
}

/// bf16 bit patterns of `values`, rounded to nearest even; NaN stays NaN (quieted), values
/// beyond the bf16 range round to infinity.
pub fn to_bf16_bits(values: &[f32]) -> Vec<u16> {
    values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

/// f16 bit patterns of `values`, rounded to nearest even; overflow -> infinity, subnormals
/// rounded correctly, NaN stays NaN (quieted).
pub fn to_f16_bits(values: &[f32]) -> Vec<u16> {
    let mut out = vec![half::f16::ZERO; values.len()];
    // Same length by construction, so the slice conversion (vectorised where the CPU can) never
    // hits its length assertion.
    out.as_mut_slice().convert_from_f32_slice(values);
    out.iter().map(|h| h.to_bits()).collect()
}

/// The f32 value of a bf16 bit pattern (exact: the bits shifted up, NaN payloads kept), the
/// same widening the checkpoint loader uses.
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// The f32 value of an f16 bit pattern (exact), the same widening the checkpoint loader uses.
pub fn f16_bits_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Bytes of `values` as uploaded in dtype `d`: little-endian f32 bits, or little-endian u16
/// bits of the rounded bf16 / f16 values.
pub fn encode(values: &[f32], d: WeightDtype) -> Vec<u8> {
    match d {
        WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightDtype::Bf16 => to_bf16_bits(values).into_iter().flat_map(u16::to_le_bytes).collect(),
        WeightDtype::F16 => to_f16_bits(values).into_iter().flat_map(u16::to_le_bytes).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cuda::TestRng as Rng;

    fn f16_is_nan(b: u16) -> bool {
        b & 0x7C00 == 0x7C00 && b & 0x03FF != 0
    }

    fn bf16_is_nan(b: u16) -> bool {
        b & 0x7F80 == 0x7F80 && b & 0x007F != 0
    }

    #[test]
    fn names_sizes_and_parsing() {
        use WeightDtype::*;
        for (d, bytes, name) in [(F32, 4, "f32"), (Bf16, 2, "bf16"), (F16, 2, "f16")] {
            assert_eq!(d.bytes(), bytes);
            assert_eq!(d.name(), name);
            assert_eq!(d.kernel_suffix(), name);
            assert_eq!(d.to_string(), name);
            assert_eq!(name.parse::<WeightDtype>(), Ok(d));
            assert_eq!(name.to_uppercase().parse::<WeightDtype>(), Ok(d));
        }
        assert_eq!("Bf16".parse::<WeightDtype>(), Ok(Bf16));
        assert_eq!("fp16".parse::<WeightDtype>(), Err(UnknownWeightDtype("fp16".into())));
        assert_eq!(" f32".parse::<WeightDtype>(), Err(UnknownWeightDtype(" f32".into())));
        assert_eq!("".parse::<WeightDtype>(), Err(UnknownWeightDtype(String::new())));
        assert!(UnknownWeightDtype("int8".into()).to_string().contains("\"int8\""));
    }

    #[test]
    fn f16_exhaustive_round_trip() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let widened: Vec<f32> = all.iter().map(|&b| f16_bits_to_f32(b)).collect();
        let back = to_f16_bits(&widened);
        for (&b, (&v, &r)) in all.iter().zip(widened.iter().zip(&back)) {
            if f16_is_nan(b) {
                assert!(v.is_nan() && f16_is_nan(r), "NaN {b:#06x} -> {r:#06x}");
            } else {
                assert_eq!(r, b, "f16 {b:#06x} -> {v:e} -> {r:#06x}");
            }
            // The scalar path agrees with the slice path.
            assert_eq!(half::f16::from_f32(v).to_bits(), r);
        }
    }

    #[test]
    fn bf16_exhaustive_round_trip() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let widened: Vec<f32> = all.iter().map(|&b| bf16_bits_to_f32(b)).collect();
        let back = to_bf16_bits(&widened);
        for (&b, (&v, &r)) in all.iter().zip(widened.iter().zip(&back)) {
            assert_eq!(v.to_bits(), u32::from(b) << 16);
            if bf16_is_nan(b) {
                assert!(v.is_nan() && bf16_is_nan(r), "NaN {b:#06x} -> {r:#06x}");
            } else {
                assert_eq!(r, b, "bf16 {b:#06x} -> {v:e} -> {r:#06x}");
            }
        }
    }

    #[test]
    fn f16_known_values() {
        let cases: [(f32, u16); 16] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3C00),
            (-2.0, 0xC000),
            (0.5, 0x3800),
            (65504.0, 0x7BFF),             // max finite
            (65519.99, 0x7BFF),            // just below the halfway point to 65536
            (65520.0, 0x7C00),             // halfway, ties to even -> inf
            (1.0e6, 0x7C00),               // overflow -> inf
            (f32::INFINITY, 0x7C00),
            (f32::NEG_INFINITY, 0xFC00),
            (6.103_515_6e-5, 0x0400),      // smallest normal 2^-14
            (5.960_464_5e-8, 0x0001),      // smallest subnormal 2^-24
            (2.980_232_2e-8, 0x0000),      // 2^-25: halfway to 0, ties to even -> 0
            (4.470_348_4e-8, 0x0001),      // 1.5 * 2^-25 -> 2^-24
            (1.000_488_3, 0x3C00),         // 1 + 2^-11: halfway, ties to even -> 1.0
        ];
        for (v, bits) in cases {
            assert_eq!(to_f16_bits(&[v]), vec![bits], "{v:e}");
        }
        // 1 + 3 * 2^-11: halfway between 0x3C01 and 0x3C02 -> even 0x3C02.
        assert_eq!(to_f16_bits(&[1.0 + 3.0 * 2f32.powi(-11)]), vec![0x3C02]);
        // Subnormal halfway: 2.5 * 2^-24 -> 2 * 2^-24 (even), 3.5 * 2^-24 -> 4 * 2^-24.
        assert_eq!(to_f16_bits(&[2.5 * 2f32.powi(-24), 3.5 * 2f32.powi(-24)]), vec![0x0002, 0x0004]);
        // Largest subnormal rounding up into the smallest normal.
        assert_eq!(to_f16_bits(&[1023.5 * 2f32.powi(-24)]), vec![0x0400]);
        assert!(f16_is_nan(to_f16_bits(&[f32::NAN])[0]));
        assert!(f16_is_nan(to_f16_bits(&[f32::from_bits(0x7F80_0001)])[0]), "signalling NaN must not become inf");
        assert_eq!(f16_bits_to_f32(0x3C00), 1.0);
        assert_eq!(f16_bits_to_f32(0x7BFF), 65504.0);
        assert_eq!(f16_bits_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0xFC00), f32::NEG_INFINITY);
        assert!(f16_bits_to_f32(0x7E00).is_nan());
    }

    #[test]
    fn bf16_known_values() {
        let b = |bits: u32| f32::from_bits(bits);
        let cases: [(f32, u16); 12] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3F80),
            (-2.0, 0xC000),
            (b(0x3F80_8000), 0x3F80), // halfway, ties to even (down)
            (b(0x3F81_8000), 0x3F82), // halfway, ties to even (up)
            (b(0x3F80_8001), 0x3F81), // above halfway
            (b(0x3F80_7FFF), 0x3F80), // below halfway
            (f32::MAX, 0x7F80),       // rounds past the largest bf16 -> inf
            (b(0x7F7F_7FFF), 0x7F7F), // below the halfway point: largest finite
            (f32::INFINITY, 0x7F80),
            (b(0x0000_0001), 0x0000), // smallest f32 subnormal -> 0
        ];
        for (v, bits) in cases {
            assert_eq!(to_bf16_bits(&[v]), vec![bits], "{:#010x}", v.to_bits());
        }
        assert!(bf16_is_nan(to_bf16_bits(&[f32::NAN])[0]));
        assert!(bf16_is_nan(to_bf16_bits(&[b(0x7F80_0001)])[0]), "NaN with only low payload must not become inf");
        assert!(bf16_is_nan(to_bf16_bits(&[b(0xFFFF_FFFF)])[0]));
        assert_eq!(bf16_bits_to_f32(0x3F80), 1.0);
        assert_eq!(bf16_bits_to_f32(0xFF80), f32::NEG_INFINITY);
    }

    /// For random f32 bit patterns the chosen 16-bit value is the nearest one (ties to even),
    /// checked against its neighbours in f64 arithmetic, independently of the conversion code.
    #[test]
    fn random_values_round_to_nearest_even() {
        struct Fmt {
            to_bits: fn(&[f32]) -> Vec<u16>,
            to_f32: fn(u16) -> f32,
            max_finite: u16, // magnitude bits of the largest finite value
            overflow_at: f64, // |x| at or above this rounds to inf
        }
        let formats = [
            Fmt { to_bits: to_f16_bits, to_f32: f16_bits_to_f32, max_finite: 0x7BFF, overflow_at: 65520.0 },
            Fmt {
                to_bits: to_bf16_bits,
                to_f32: bf16_bits_to_f32,
                max_finite: 0x7F7F,
                overflow_at: f64::from(f32::from_bits(0x7F7F_8000)),
            },
        ];
        let mut rng = Rng(42);
        for fmt in &formats {
            let xs: Vec<f32> = (0..200_000)
                .map(|i| {
                    let r = rng.next();
                    // Half the samples in the f16-relevant exponent range, half anywhere.
                    if i % 2 == 0 {
                        let exp = 100 + (r >> 40) % 45; // 2^-27 .. 2^17
                        f32::from_bits(((r as u32) & 0x8000_0000) | ((exp as u32) << 23) | ((r >> 8) as u32 & 0x7F_FFFF))
                    } else {
                        f32::from_bits(r as u32)
                    }
                })
                .filter(|x| !x.is_nan())
                .collect();
            let got = (fmt.to_bits)(&xs);
            for (&x, &r) in xs.iter().zip(&got) {
                assert_eq!(r & 0x8000 != 0, x.is_sign_negative(), "sign of {x:e}");
                let mag = r & 0x7FFF;
                let ax = f64::from(x.abs());
                if mag > fmt.max_finite {
                    assert!(ax >= fmt.overflow_at, "{x:e} -> inf ({r:#06x})");
                    continue;
                }
                assert!(ax < fmt.overflow_at, "{x:e} should overflow, got {r:#06x}");
                let d = |m: u16| (ax - f64::from((fmt.to_f32)(m))).abs();
                let here = d(mag);
                let mut neighbours = vec![];
                if mag > 0 {
                    neighbours.push(mag - 1);
                }
                if mag < fmt.max_finite {
                    neighbours.push(mag + 1);
                }
                for n in neighbours {
                    let there = d(n);
                    assert!(here <= there, "{x:e} -> {mag:#06x}, but {n:#06x} is nearer");
                    if here == there {
                        assert_eq!(mag & 1, 0, "{x:e}: tie must go to even, got {mag:#06x}");
                    }
                }
            }
        }
    }

    #[test]
    fn narrowest_exact_recovers_the_stored_dtype() {
        use WeightDtype::*;
        assert_eq!(narrowest_exact(&[]), F32);
        assert_eq!(narrowest_exact(&[0.0, 1.0, -2.0, 0.5]), Bf16); // both exact: Bf16
        assert_eq!(narrowest_exact(&[f32::INFINITY, f32::NAN, 1.0]), Bf16);
        assert_eq!(narrowest_exact(&[2f32.powi(100), 1.0]), Bf16); // beyond f16 range, bf16 exact
        assert_eq!(narrowest_exact(&[1.0 + 2f32.powi(-10), 1.0]), F16); // f16 precision, not bf16
        assert_eq!(narrowest_exact(&[2f32.powi(-24) * 513.0]), F16); // f16 subnormal, 10 significant bits
        assert_eq!(narrowest_exact(&[1.0 + 2f32.powi(-10), f32::INFINITY]), F16);
        assert_eq!(narrowest_exact(&[0.1]), F32);
        assert_eq!(narrowest_exact(&[1.0 + 2f32.powi(-10), 2f32.powi(100)]), F32); // needs both
        assert_eq!(narrowest_exact(&[1.0 + 2f32.powi(-10), 2f32.powi(-30)]), F32); // below f16 subnormals
        assert_eq!(narrowest_exact(&[f32::from_bits(0x7FC0_0001)]), F32); // NaN payload in low bits
        assert_eq!(narrowest_exact(&[65504.0 + 16.0 + 1.0 / 64.0]), F32);

        // Every bf16 value is recognised as such; a tensor of all of them is Bf16.
        let all_bf16: Vec<f32> = (0..=u16::MAX).map(bf16_bits_to_f32).collect();
        assert_eq!(narrowest_exact(&all_bf16), Bf16);
        // Every value widened from f16 (NaNs included) is exact in f16 (or in bf16).
        let all_f16: Vec<f32> = (0..=u16::MAX).map(f16_bits_to_f32).collect();
        assert_eq!(narrowest_exact(&all_f16), F16);
        for (b, &v) in all_f16.iter().enumerate() {
            let want = if v.to_bits() & 0xFFFF == 0 { Bf16 } else { F16 };
            assert_eq!(narrowest_exact(&[v]), want, "f16 {b:#06x}");
        }
        // Typical f32 weights are F32.
        let mut rng = Rng(3);
        let f32s: Vec<f32> = (0..1000).map(|_| (rng.next() % 1_000_000) as f32 / 999_983.0 - 0.5).collect();
        assert_eq!(narrowest_exact(&f32s), F32);
        // Whatever is chosen, encoding in it is lossless.
        for vals in [&all_bf16[..], &all_f16[..], &f32s[..]] {
            let d = narrowest_exact(vals);
            let bytes = encode(vals, d);
            let decoded: Vec<f32> = match d {
                F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                Bf16 => bytes.chunks_exact(2).map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
                F16 => bytes.chunks_exact(2).map(|c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            };
            for (a, b) in vals.iter().zip(&decoded) {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{a:e} vs {b:e} in {d}");
            }
        }
    }

    #[test]
    fn encode_is_little_endian() {
        let v = [1.0f32, -2.0, 0.1];
        assert_eq!(encode(&v, WeightDtype::F32), [
            0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0, 0xCD, 0xCC, 0xCC, 0x3D
        ]);
        // 0.1: bf16 0x3DCD (rounded up), f16 0x2E66.
        assert_eq!(encode(&v, WeightDtype::Bf16), [0x80, 0x3F, 0x00, 0xC0, 0xCD, 0x3D]);
        assert_eq!(encode(&v, WeightDtype::F16), [0x00, 0x3C, 0x00, 0xC0, 0x66, 0x2E]);
        for d in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            assert!(encode(&[], d).is_empty());
            assert_eq!(encode(&v, d).len(), v.len() * d.bytes());
        }
    }
}
