//! Collective communication between tensor-parallel ranks: all-reduce (sum) and
//! all-gather, behind one [`Communicator`] trait so the sharded forward pass does not
//! know whether its peers are threads on this machine or GPUs across a network.
//!
//! Two implementations:
//! - [`ThreadComm`]: every rank is a thread of this process holding its own weight shard
//!   and KV cache; tensors are exchanged through shared slots and a barrier. The sum runs
//!   in rank order on every rank, so every rank gets bit-identical results whatever the
//!   thread timing (a tree or ring sum would make the result depend on the order in
//!   which floating-point partial sums meet, and ranks could then diverge).
//! - `NcclComm` (feature `cuda`): NCCL through cudarc, one communicator per GPU; ranks
//!   on several nodes find each other through NCCL's own bootstrap (a unique id created
//!   on rank 0 and handed to the others out of band). No home-made collective engine.
//!
//! Every collective is timed ([`CommStats`]): the accumulated wall time includes waiting
//! for the slowest peer, which is what a rank actually loses to communication, and is
//! what `llmem bench` reports as the all-reduce share of a step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Accumulated time and count of one rank's collectives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommStats {
    pub all_reduce_count: u64,
    pub all_reduce_nanos: u64,
    pub all_gather_count: u64,
    pub all_gather_nanos: u64,
}

impl CommStats {
    /// Time in all collectives, seconds.
    pub fn total_seconds(&self) -> f64 {
        (self.all_reduce_nanos + self.all_gather_nanos) as f64 * 1e-9
    }
}

/// Lock-free counters behind [`CommStats`].
#[derive(Debug, Default)]
pub struct CommTimer {
    reduce_count: AtomicU64,
    reduce_nanos: AtomicU64,
    gather_count: AtomicU64,
    gather_nanos: AtomicU64,
}

impl CommTimer {
    fn record(&self, gather: bool, start: Instant) {
        let nanos = start.elapsed().as_nanos() as u64;
        let (count, total) = if gather {
            (&self.gather_count, &self.gather_nanos)
        } else {
            (&self.reduce_count, &self.reduce_nanos)
        };
        count.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn stats(&self) -> CommStats {
        CommStats {
            all_reduce_count: self.reduce_count.load(Ordering::Relaxed),
            all_reduce_nanos: self.reduce_nanos.load(Ordering::Relaxed),
            all_gather_count: self.gather_count.load(Ordering::Relaxed),
            all_gather_nanos: self.gather_nanos.load(Ordering::Relaxed),
        }
    }

    pub fn reset(&self) {
        for c in [
            &self.reduce_count,
            &self.reduce_nanos,
            &self.gather_count,
            &self.gather_nanos,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The collectives tensor parallelism needs. Every rank of a group must call the same
/// collectives in the same order with tensors of matching shapes.
pub trait Communicator: Send + Sync {
    /// This rank's index in the group, `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of every rank's `t` (same shape on every rank), on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` concatenated along `dim` in rank order; the sizes along `dim`
    /// may differ between ranks (an uneven vocabulary split), the other dims may not.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// The time spent in collectives so far.
    fn stats(&self) -> CommStats;
    fn reset_stats(&self);
    /// Wake every peer blocked in a collective with an error, so a rank that failed does
    /// not leave the others waiting forever. The group is unusable afterwards.
    fn abort(&self) {}
}

/// A group of one: collectives are the identity (TP = 1 through the sharded code path).
#[derive(Debug, Default)]
pub struct SingleComm {
    timer: CommTimer,
}

impl Communicator for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn stats(&self) -> CommStats {
        self.timer.stats()
    }
    fn reset_stats(&self) {
        self.timer.reset()
    }
}

/// State shared by the threads of one [`ThreadComm`] group.
struct Shared {
    world: usize,
    state: Mutex<SharedState>,
    cond: Condvar,
}

struct SharedState {
    /// One deposited tensor per rank for the collective in progress.
    slots: Vec<Option<Tensor>>,
    /// Ranks that reached the current barrier.
    arrived: usize,
    /// Bumped each time a barrier opens.
    generation: u64,
    aborted: bool,
}

/// One rank of a group of threads exchanging tensors through shared slots.
///
/// A collective is deposit -> barrier -> read every slot -> barrier: the second barrier
/// keeps a fast rank from overwriting its slot for the next collective while a slow one
/// still reads the current one. Tensors are reference counted, so depositing copies
/// nothing; the reduction itself is `tp - 1` additions per rank.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
    timer: CommTimer,
}

impl ThreadComm {
    /// The `world` communicators of a new group, rank 0 first. Hand one to each thread.
    pub fn group(world: usize) -> Result<Vec<ThreadComm>> {
        if world == 0 {
            return Err(Error::InvalidInput(
                "a communicator group needs at least one rank".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(SharedState {
                slots: vec![None; world],
                arrived: 0,
                generation: 0,
                aborted: false,
            }),
            cond: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
                timer: CommTimer::default(),
            })
            .collect())
    }

    fn aborted() -> Error {
        Error::InvalidInput(
            "tensor-parallel group aborted: another rank failed during this pass".into(),
        )
    }

    /// Deposit `t`, wait for every rank, run `read` over all slots in rank order, wait
    /// again so the slots stay intact until everyone has read them.
    fn exchange<R>(&self, t: &Tensor, read: impl FnOnce(&[Tensor]) -> Result<R>) -> Result<R> {
        let shared: &Shared = &self.shared;
        let lock = || shared.state.lock().map_err(|_| Self::aborted());
        let mut state = lock()?;
        if state.aborted {
            return Err(Self::aborted());
        }
        state.slots[self.rank] = Some(t.clone());
        state = self.wait_all(state)?;
        let tensors: Vec<Tensor> = state.slots.iter().flatten().cloned().collect();
        drop(state);
        let out = if tensors.len() == self.shared.world {
            read(&tensors)
        } else {
            Err(Error::InvalidInput(format!(
                "collective: {} of {} ranks deposited a tensor",
                tensors.len(),
                self.shared.world
            )))
        };
        // Every rank has read the slots once past this barrier; each then empties its
        // own, so a deposit does not outlive its collective (it would hold this rank's
        // tensor until the next pass and free it in the middle of that pass). No other
        // rank deposits into this slot, and this rank's next deposit comes after.
        let mut state = self.wait_all(lock()?)?;
        state.slots[self.rank] = None;
        drop(state);
        out
    }

    /// The barrier: the last rank to arrive opens it for everyone.
    fn wait_all<'a>(
        &self,
        mut state: std::sync::MutexGuard<'a, SharedState>,
    ) -> Result<std::sync::MutexGuard<'a, SharedState>> {
        if state.aborted {
            return Err(Self::aborted());
        }
        let gen = state.generation;
        state.arrived += 1;
        if state.arrived == self.shared.world {
            state.arrived = 0;
            state.generation += 1;
            self.shared.cond.notify_all();
            return Ok(state);
        }
        while state.generation == gen {
            if state.aborted {
                return Err(Self::aborted());
            }
            state = self.shared.cond.wait(state).map_err(|_| Self::aborted())?;
        }
        Ok(state)
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.shared.world == 1 {
            return Ok(t.clone());
        }
        let start = Instant::now();
        let out = self.exchange(t, |all| {
            let mut sum = all[0].clone();
            for other in &all[1..] {
                if other.dims() != sum.dims() {
                    return Err(Error::InvalidInput(format!(
                        "all-reduce: ranks hold shapes {:?} and {:?}",
                        sum.dims(),
                        other.dims()
                    )));
                }
                sum = (sum + other)?;
            }
            Ok(sum)
        });
        self.timer.record(false, start);
        out
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if self.shared.world == 1 {
            return Ok(t.clone());
        }
        let start = Instant::now();
        let out = self.exchange(t, |all| Ok(Tensor::cat(all, dim)?));
        self.timer.record(true, start);
        out
    }

    fn stats(&self) -> CommStats {
        self.timer.stats()
    }

    fn reset_stats(&self) {
        self.timer.reset()
    }

    fn abort(&self) {
        // Even a poisoned lock holds usable state: set the flag and wake everyone.
        let mut state = match self.shared.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.aborted = true;
        self.shared.cond.notify_all();
    }
}

#[cfg(feature = "cuda")]
pub use nccl::NcclComm;

/// NCCL through cudarc. One [`NcclComm`] per GPU: either all GPUs of this process
/// ([`NcclComm::group`], one thread per GPU drives them) or one per process / node
/// ([`NcclComm::from_rank`], with the [`NcclId`] created by rank 0 and sent to the
/// others by any means: NCCL's own bootstrap then connects them over the network).
#[cfg(feature = "cuda")]
mod nccl {
    use std::sync::Mutex;
    use std::time::Instant;

    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor};
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};

    use super::{CommStats, CommTimer, Communicator};
    use crate::error::{Error, Result};

    /// NCCL's unique id: created on rank 0 ([`NcclId::new`]), its 128 bytes sent to the
    /// other ranks, rebuilt there with [`NcclId::from_bytes`].
    #[derive(Clone, Copy)]
    pub struct NcclId(Id);

    impl NcclId {
        pub fn new() -> Result<Self> {
            Id::new().map(NcclId).map_err(nccl_err)
        }
        pub fn bytes(&self) -> [std::ffi::c_char; 128] {
            *self.0.internal()
        }
        pub fn from_bytes(bytes: [std::ffi::c_char; 128]) -> Self {
            NcclId(Id::uninit(bytes))
        }
    }

    /// `ncclComm_t` is a raw pointer, so cudarc's `Comm` is neither Send nor Sync.
    /// NCCL allows a communicator to be used from any thread as long as calls on it do
    /// not overlap; the mutex serialises them.
    struct CommCell(Comm);
    // Safety: see above; every use goes through `NcclComm::comm`'s mutex.
    unsafe impl Send for CommCell {}

    pub struct NcclComm {
        comm: Mutex<CommCell>,
        device: CudaDevice,
        rank: usize,
        world: usize,
        timer: CommTimer,
    }

    fn nccl_err(e: cudarc::nccl::result::NcclError) -> Error {
        Error::InvalidInput(format!("NCCL: {e:?}"))
    }

    impl NcclComm {
        /// Join a group of `world` ranks as `rank` on GPU `device`.
        pub fn from_rank(
            device: &CudaDevice,
            rank: usize,
            world: usize,
            id: NcclId,
        ) -> Result<Self> {
            let comm =
                Comm::from_rank(device.cuda_stream(), rank, world, id.0).map_err(nccl_err)?;
            Ok(NcclComm {
                comm: Mutex::new(CommCell(comm)),
                device: device.clone(),
                rank,
                world,
                timer: CommTimer::default(),
            })
        }

        /// One communicator per GPU of this process (single-process, multi-GPU).
        pub fn group(devices: &[CudaDevice]) -> Result<Vec<Self>> {
            let streams = devices.iter().map(|d| d.cuda_stream()).collect();
            let comms = Comm::from_devices(streams).map_err(nccl_err)?;
            let world = devices.len();
            Ok(comms
                .into_iter()
                .zip(devices)
                .enumerate()
                .map(|(rank, (comm, device))| NcclComm {
                    comm: Mutex::new(CommCell(comm)),
                    device: device.clone(),
                    rank,
                    world,
                    timer: CommTimer::default(),
                })
                .collect())
        }

        fn comm(&self) -> Result<std::sync::MutexGuard<'_, CommCell>> {
            self.comm
                .lock()
                .map_err(|_| Error::InvalidInput("NCCL communicator lock poisoned".into()))
        }

        /// `t` as a contiguous f32 tensor on this communicator's GPU.
        fn check(&self, t: &Tensor) -> Result<Tensor> {
            match t.device() {
                Device::Cuda(_) => Ok(t.to_dtype(DType::F32)?.contiguous()?),
                other => Err(Error::InvalidInput(format!(
                    "NCCL collectives need CUDA tensors, got one on {other:?}"
                ))),
            }
        }

        /// Run `f(src, dst)` over `t`'s f32 storage and a fresh `out_len` buffer.
        fn collective(
            &self,
            t: &Tensor,
            out_len: usize,
            out_shape: Vec<usize>,
            f: impl FnOnce(
                &Comm,
                &cudarc::driver::CudaView<'_, f32>,
                &mut cudarc::driver::CudaSlice<f32>,
            ) -> std::result::Result<(), cudarc::nccl::result::NcclError>,
        ) -> Result<Tensor> {
            let dtype = t.dtype();
            let t = self.check(t)?;
            let mut dst = self.device.alloc_zeros::<f32>(out_len)?;
            {
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cuda(cuda) = &*storage else {
                    return Err(Error::InvalidInput("NCCL: tensor is not on a GPU".into()));
                };
                let (start, end) = layout
                    .contiguous_offsets()
                    .ok_or_else(|| Error::InvalidInput("NCCL: tensor is not contiguous".into()))?;
                let src = cuda.as_cuda_slice::<f32>()?.slice(start..end);
                let guard = self.comm()?;
                f(&guard.0, &src, &mut dst).map_err(nccl_err)?;
            }
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, self.device.clone()));
            let out = Tensor::from_storage(storage, out_shape, BackpropOp::none(), false);
            Ok(out.to_dtype(dtype)?)
        }
    }

    impl Communicator for NcclComm {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            let start = Instant::now();
            let n = t.elem_count();
            let out = self.collective(t, n, t.dims().to_vec(), |comm, src, dst| {
                comm.all_reduce(src, dst, &ReduceOp::Sum).map(|_| ())
            });
            self.timer.record(false, start);
            out
        }

        /// NCCL's all-gather needs equal sizes and concatenates along the first dim:
        /// the tensor is moved so `dim` leads, gathered, and moved back. Uneven shares
        /// (a vocabulary that TP does not divide) are refused.
        fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
            let start = Instant::now();
            let lead = t.transpose(0, dim)?.contiguous()?;
            let mut shape = lead.dims().to_vec();
            shape[0] *= self.world;
            let n = lead.elem_count() * self.world;
            let out = self
                .collective(&lead, n, shape, |comm, src, dst| {
                    comm.all_gather(src, dst).map(|_| ())
                })
                .and_then(|g| Ok(g.transpose(0, dim)?.contiguous()?));
            self.timer.record(true, start);
            out
        }

        fn stats(&self) -> CommStats {
            self.timer.stats()
        }

        fn reset_stats(&self) {
            self.timer.reset()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run_group<R: Send + 'static>(
        world: usize,
        f: impl Fn(ThreadComm) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadComm::group(world)
            .unwrap()
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        let outs = run_group(3, |c| {
            let mut got = Vec::new();
            // Many rounds: a slot overwritten too early would show up as a wrong sum.
            for round in 0..50u32 {
                let v = (c.rank() as f32 + 1.0) * (round as f32 + 1.0);
                let t = Tensor::new(&[v, 10.0 * v], &Device::Cpu).unwrap();
                got.push(c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap());
            }
            (got, c.stats())
        });
        for (got, stats) in &outs {
            for (round, row) in got.iter().enumerate() {
                let r = round as f32 + 1.0;
                assert_eq!(row, &vec![6.0 * r, 60.0 * r]);
            }
            assert_eq!(stats.all_reduce_count, 50);
        }
    }

    #[test]
    fn all_gather_concatenates_uneven_shares_in_rank_order() {
        let outs = run_group(3, |c| {
            let r = c.rank();
            // rank r holds r + 1 columns filled with r
            let t = Tensor::full(r as f32, (2, r + 1), &Device::Cpu).unwrap();
            c.all_gather(&t, 1).unwrap().to_vec2::<f32>().unwrap()
        });
        for rows in outs {
            for row in rows {
                assert_eq!(row, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            }
        }
    }

    #[test]
    fn abort_wakes_peers_waiting_in_a_collective() {
        let outs = run_group(3, |c| {
            if c.rank() == 2 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                c.abort();
                return true;
            }
            let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            c.all_reduce_sum(&t).is_err()
        });
        assert_eq!(outs, vec![true, true, true]);
    }

    #[test]
    fn mismatched_shapes_are_an_error_not_a_panic() {
        let outs = run_group(2, |c| {
            let t = Tensor::zeros(c.rank() + 1, candle_core::DType::F32, &Device::Cpu).unwrap();
            c.all_reduce_sum(&t).is_err()
        });
        assert_eq!(outs, vec![true, true]);
    }
}
