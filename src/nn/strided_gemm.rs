//! A matrix multiply over strided operands (the `gemm` crate, which candle's CPU matmul also
//! uses), shared by the fused ops that address their operands in place.

use gemm::Parallelism;

/// gemm's own threads for products run one at a time: all of rayon's pool, if it has more than
/// one thread.
pub(crate) fn inner_parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    }
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: users give every task its own elements to write (in attention, its batch-head's
// rows and columns; in the convolution, its image or tile), and the buffer outlives the parallel loop.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element `i` elements in. A method, so that closures capture the whole `Out` (and its
    /// `Send`), not the bare pointer field.
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `dst[m x n] (+)= alpha * lhs[m x k] * rhs[k x n]` on one thread, each operand given by its
/// first element and its row and column strides (in elements).
///
/// # Safety
/// Every element the strides reach must be inside its buffer, and `dst` must not overlap the
/// others or be written by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f32,
) {
    gemm_into_par(
        (m, n, k),
        dst,
        (dst_rs, dst_cs),
        accumulate,
        lhs,
        (lhs_rs, lhs_cs),
        rhs,
        (rhs_rs, rhs_cs),
        alpha,
        Parallelism::None,
    )
}

/// [`gemm_into`] with the crate's own threading (`Parallelism::Rayon(n)`: n threads of rayon's
/// pool) for callers that run their products one at a time.
///
/// # Safety
/// As [`gemm_into`]; `dst` must not be written by any other task meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into_par(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f32,
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        parallelism,
    )
}
