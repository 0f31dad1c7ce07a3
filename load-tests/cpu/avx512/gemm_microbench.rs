// Single-threaded f32 GEMM GFLOP/s by thread CPU time, at SD1.5 and tiny shapes, gemm 0.19.0
// built without and with its x86-v4 feature. Cargo.toml of the throwaway crate:
//   [features] v4 = ["gemm/x86-v4"]
//   [dependencies] gemm = { version = "=0.19.0", default-features = false, features = ["std"] }
//   libc = "0.2"
// cargo build --release (gb-avx2), cargo build --release --features v4 (gb-avx512), then
// run them in alternation: gemm-microbench.log.
// Single-threaded f32 GEMM GFLOP/s at SD1.5 shapes, gemm 0.19 (built with and without x86-v4).
fn cpu_s() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}
fn main() {
    // (m, k, n, what)
    let shapes = [
        (4096, 2880, 320, "conv3x3 320ch 64x64 (im2col)"),
        (4096, 320, 320, "linear 320"),
        (4096, 320, 1280, "ff in 320->1280"),
        (4096, 40, 4096, "attn QK^T head 40"),
        (4096, 4096, 40, "attn PV head 40"),
        (256, 11520, 1280, "conv3x3 1280ch 16x16"),
        (64, 128, 384, "tiny linear"),
    ];
    for &(m, k, n, what) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32) * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 89) as f32) * 0.01).collect();
        let mut c = vec![0f32; m * n];
        let run = |c: &mut [f32]| unsafe {
            gemm::gemm(
                m, n, k, c.as_mut_ptr(), 1, n as isize, false,
                a.as_ptr(), 1, k as isize, b.as_ptr(), 1, n as isize,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            )
        };
        run(&mut c);
        let flops = 2.0 * (m * n * k) as f64;
        let reps = ((2e10 / flops) as usize).max(3);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = cpu_s();
            for _ in 0..reps { run(&mut c); }
            best = best.min((cpu_s() - t) / reps as f64);
        }
        println!("{:>5}x{:>5}x{:>5} {:<30} {:7.1} GFLOP/s", m, k, n, what, flops / best / 1e9);
    }
}
