//! `exp` and row reductions over slices in a form the compiler vectorizes.
//!
//! libm's scalar `expf` was 6.5% of a forward pass (softmax and SiLU) in a `perf` profile of
//! `fewstep eval`. This is the classic range reduction `x = n ln2 + r`, a degree-6 polynomial
//! for `e^r` on `|r| <= ln2/2` and `2^n` built from the exponent bits: no branches and no
//! libm calls, so the loop runs 8 lanes wide where AVX2 + FMA are present (checked at run
//! time) and 4 wide with the baseline SSE2. Relative error stays below 2e-7 (tested).

/// `log2(e)`.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in a part exact in f32 and a remainder, so `n ln2` subtracts without rounding.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting `1.5 * 2^23` rounds to the nearest integer without `floor`.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
fn exp1(x: f32) -> f32 {
    // Below -87.3 the result is subnormal; clamp so 2^n stays a normal float.
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // `n` as an integer: the low mantissa bits of `shifted` hold it (|n| < 2^22). Read from
    // the bits, where a float-to-int `as` cast would saturate lane by lane (scalar code, 40%
    // of the SiLU kernel's time by `perf annotate`).
    let ni = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(ni.wrapping_add(127) << 23)
}

#[inline(always)]
fn exp_sub_generic(xs: &mut [f32], sub: f32) {
    for v in xs.iter_mut() {
        *v = exp1(*v - sub);
    }
}

/// Elements per block of [`map_blocks`].
const BLOCK: usize = 256;

/// `f` over `xs` (and `ys`, the same length) in blocks computed into a stack buffer and
/// appended to the output: each output element is written once, where a zeroed `vec!` output
/// costs a memset pass of its own, and unlike `collect` the loop stays inlined in the caller,
/// so it is vectorized with the caller's target features.
#[inline(always)]
fn map_blocks(xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    debug_assert_eq!(xs.len(), ys.len());
    let mut out = Vec::with_capacity(xs.len());
    let mut buf = [0f32; BLOCK];
    for (xb, yb) in xs.chunks(BLOCK).zip(ys.chunks(BLOCK)) {
        let b = &mut buf[..xb.len()];
        for ((o, &x), &y) in b.iter_mut().zip(xb).zip(yb) {
            *o = f(x, y);
        }
        out.extend_from_slice(b);
    }
    out
}

#[inline(always)]
fn silu_generic(xs: &[f32]) -> Vec<f32> {
    map_blocks(xs, xs, |x, _| x / (1.0 + exp1(-x)))
}

#[inline(always)]
fn silu_inplace_generic(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x /= 1.0 + exp1(-*x);
    }
}

#[inline(always)]
fn silu_backward_generic(xs: &[f32], grad: &[f32]) -> Vec<f32> {
    map_blocks(xs, grad, |x, g| {
        let s = 1.0 / (1.0 + exp1(-x));
        g * s * (1.0 + x * (1.0 - s))
    })
}

/// Softmax of each `n`-wide row of `x`, in place: max, `exp(x - max)`, sum and scale, each row
/// in one go while it is in L1.
#[inline(always)]
fn softmax_rows_generic(x: &mut [f32], n: usize) {
    for row in x.chunks_mut(n) {
        exp_sub_generic(row, max(row));
        let inv = 1.0 / sum(row);
        row.iter_mut().for_each(|y| *y *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_rows_avx2(x: &mut [f32], n: usize) {
    softmax_rows_generic(x, n)
}

/// Softmax over each `n`-wide row of `x` (row-major), in place.
pub fn softmax_rows_inplace(x: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        return unsafe { softmax_rows_avx2(x, n) };
    }
    softmax_rows_generic(x, n)
}

/// Softmax over each `n`-wide row of `x` (row-major).
pub fn softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    softmax_rows_inplace(&mut out, n);
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_backward_avx2(xs: &[f32], grad: &[f32]) -> Vec<f32> {
    silu_backward_generic(xs, grad)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sub_avx2(xs: &mut [f32], sub: f32) {
    exp_sub_generic(xs, sub)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_avx2(xs: &[f32]) -> Vec<f32> {
    silu_generic(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_inplace_avx2(xs: &mut [f32]) {
    silu_inplace_generic(xs)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `xs[i] = exp(xs[i] - sub)` (softmax's numerator).
pub fn exp_sub_inplace(xs: &mut [f32], sub: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        unsafe { exp_sub_avx2(xs, sub) };
        return;
    }
    exp_sub_generic(xs, sub)
}

/// `xs[i] * sigmoid(xs[i])`.
pub fn silu(xs: &[f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        return unsafe { silu_avx2(xs) };
    }
    silu_generic(xs)
}

/// [`silu`] in place, for a buffer that is not needed afterwards (an inference epilogue).
pub fn silu_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        unsafe { silu_inplace_avx2(xs) };
        return;
    }
    silu_inplace_generic(xs)
}

/// `grad[i] * d silu / dx (xs[i])`, with `d silu/dx = s (1 + x (1 - s))`.
pub fn silu_backward(xs: &[f32], grad: &[f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        return unsafe { silu_backward_avx2(xs, grad) };
    }
    silu_backward_generic(xs, grad)
}

// Row reductions. A plain `iter().sum()` is one chain of dependent adds (f32 addition is not
// associative, so the compiler keeps the order): on a 128-wide layer-norm row that chain, not
// the arithmetic, set the speed of the layer norms (7% of a tiny forward by `perf`). Eight
// independent partial results let the compiler use vector registers instead (more lanes cost
// more than they save on attention's 24- and 64-wide rows).
const LANES: usize = 8;

/// `f(acc, a[i], b[i])` folded over `a` and `b` (same length) in `LANES` interleaved lanes,
/// the lanes then combined with `join`.
#[inline(always)]
fn fold2(
    a: &[f32],
    b: &[f32],
    init: f32,
    f: impl Fn(f32, f32, f32) -> f32,
    join: impl Fn(f32, f32) -> f32,
) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [init; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(xa).zip(xb) {
            *s = f(*s, u, v);
        }
    }
    let tail = ra.iter().zip(rb).fold(init, |s, (&u, &v)| f(s, u, v));
    acc.into_iter().fold(tail, join)
}

/// `sum(xs)`.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    fold2(xs, xs, 0.0, |s, x, _| s + x, |a, b| a + b)
}

/// `sum(a[i] * b[i])`.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    fold2(a, b, 0.0, |s, x, y| s + x * y, |a, b| a + b)
}

/// `sum((xs[i] - c)^2)`.
#[inline(always)]
pub fn sum_sq_dev(xs: &[f32], c: f32) -> f32 {
    fold2(xs, xs, 0.0, |s, x, _| s + (x - c) * (x - c), |a, b| a + b)
}

/// `max(xs)` (`-inf` for an empty slice), ignoring NaNs like `f32::max`. A plain comparison
/// compiles to one `maxps`; `f32::max`'s NaN rule took three instructions a lane.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let m = |s: f32, x: f32| if x > s { x } else { s };
    fold2(xs, xs, f32::NEG_INFINITY, |s, x, _| m(s, x), m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_libm_over_the_softmax_range() {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + i as f32 * 87.0 / 200_000.0)
            .collect();
        let mut fast = xs.clone();
        exp_sub_inplace(&mut fast, 0.0);
        let mut generic = xs.clone();
        exp_sub_generic(&mut generic, 0.0);
        for ((x, f), g) in xs.iter().zip(&fast).zip(&generic) {
            let want = (*x as f64).exp();
            let rel = ((*f as f64 - want) / want).abs();
            assert!(rel < 2e-7, "exp({x}) = {f}, want {want} (rel {rel})");
            assert_eq!(f, g, "the vectorized and scalar paths agree");
        }
        // Positive arguments (SiLU of negative inputs) and the clamped tails.
        let mut big = vec![10.0f32, 80.0, -1000.0];
        exp_sub_inplace(&mut big, 0.0);
        assert!(((big[0] as f64 - 10f64.exp()) / 10f64.exp()).abs() < 2e-7);
        assert!(((big[1] as f64 - 80f64.exp()) / 80f64.exp()).abs() < 2e-7);
        assert!(big[2] >= 0.0 && big[2] < 1e-37);
    }

    #[test]
    fn silu_matches_the_definition() {
        let xs: Vec<f32> = (0..2001).map(|i| -20.0 + i as f32 * 0.02).collect();
        let out = silu(&xs);
        assert_eq!(out.len(), xs.len());
        for (x, y) in xs.iter().zip(&out) {
            let want = *x as f64 / (1.0 + (-*x as f64).exp());
            assert!(
                (*y as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "silu({x})"
            );
        }
        // In place, bit for bit the same.
        let mut inplace = xs.clone();
        silu_inplace(&mut inplace);
        assert_eq!(inplace, out);
    }

    #[test]
    fn lane_reductions_match_serial_ones() {
        // Lengths below, at and across the lane count, so the remainder path runs too.
        for n in [0usize, 1, 7, 16, 24, 64, 129] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 11 % 19) as f32 - 9.0) * 0.21)
                .collect();
            let close = |x: f32, y: f64| (x as f64 - y).abs() <= 1e-5 * y.abs().max(1.0);
            let s: f64 = a.iter().map(|&v| v as f64).sum();
            assert!(close(sum(&a), s), "sum n={n}");
            let d: f64 = a.iter().zip(&b).map(|(&u, &v)| u as f64 * v as f64).sum();
            assert!(close(dot(&a, &b), d), "dot n={n}");
            let m = s / n.max(1) as f64;
            let q: f64 = a.iter().map(|&v| (v as f64 - m).powi(2)).sum();
            assert!(close(sum_sq_dev(&a, m as f32), q), "sum_sq_dev n={n}");
            let want = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), want, "max n={n}");
        }
    }
}
