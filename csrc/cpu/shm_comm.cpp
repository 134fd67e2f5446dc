// The shared-memory collectives of shm_comm.h: the segment, the stamps, the bounded waits, and
// the ops' adapters.
#include "cpu/shm_comm.h"

#include <fcntl.h>
#include <signal.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "cpu/vec.h"

namespace fastgen::cpu {

namespace {

constexpr int64_t kMaxRanks = 64;
constexpr int64_t kHeaderBytes = 4096;
constexpr int64_t kStampBytes = 64;  // a stamp alone on its cache line

using Clock = std::chrono::steady_clock;

// Whether process pid has exited (gone, or a zombie its parent has not reaped yet).
bool process_exited(int64_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const size_t paren = text.rfind(')');  // "pid (comm) S ...": the state follows the name
  if (paren == std::string::npos || paren + 2 >= text.size()) return false;
  const char state = text[paren + 2];
  return state == 'Z' || state == 'X';
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Header {
  int64_t world_size;
  int64_t buffer_bytes;
  int64_t joined;  // ranks that have mapped the segment (atomic_ref)
  int64_t pids[kMaxRanks];
};
static_assert(sizeof(Header) <= kHeaderBytes);

class ShmGroup {
 public:
  ShmGroup(std::string name, int64_t world, int64_t rank, int64_t buffer_bytes, double timeout_s)
      : name_("/" + std::move(name)), world_(world), rank_(rank), buffer_bytes_(buffer_bytes),
        timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))) {
    slot_bytes_ = kStampBytes + 2 * buffer_bytes_;
    bytes_ = kHeaderBytes + world_ * slot_bytes_;
    const auto deadline = Clock::now() + timeout_;
    int fd = -1;
    if (rank_ == 0) {
      fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      TORCH_CHECK(fd >= 0, "shm group ", name_, ": cannot create the shared-memory segment: ", std::strerror(errno));
      if (ftruncate(fd, bytes_) != 0) {
        const int error = errno;
        close(fd);
        shm_unlink(name_.c_str());
        TORCH_CHECK(false, "shm group ", name_, ": cannot size the segment to ", bytes_, " bytes: ", std::strerror(error));
      }
    } else {
      // Rank 0 creates and sizes it; wait for both.
      for (;;) {
        fd = shm_open(name_.c_str(), O_RDWR, 0600);
        struct stat st {};
        if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size == bytes_) break;
        if (fd >= 0) close(fd);
        TORCH_CHECK(Clock::now() < deadline, "shm group ", name_, ": rank ", rank_,
                    " found no segment from rank 0 within ", timeout_s, " s");
        usleep(1000);
      }
    }
    void* base = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    TORCH_CHECK(base != MAP_FAILED, "shm group ", name_, ": mmap failed: ", std::strerror(errno));
    base_ = static_cast<char*>(base);
    Header& h = header();
    if (rank_ == 0) {
      h.world_size = world_;
      h.buffer_bytes = buffer_bytes_;
    }
    h.pids[rank_] = getpid();
    std::atomic_ref<int64_t>(h.joined).fetch_add(1, std::memory_order_acq_rel);
    // Everyone has mapped it (after which rank 0 unlinks the name: nothing is left behind in
    // /dev/shm however the processes end).
    while (std::atomic_ref<int64_t>(h.joined).load(std::memory_order_acquire) < world_) {
      if (Clock::now() > deadline) {
        if (rank_ == 0) shm_unlink(name_.c_str());
        TORCH_CHECK(false, "shm group ", name_, ": only ", std::atomic_ref<int64_t>(h.joined).load(), " of ", world_,
                    " ranks joined within ", timeout_s, " s");
      }
      usleep(200);
    }
    if (rank_ == 0) shm_unlink(name_.c_str());
  }

  ~ShmGroup() { munmap(base_, bytes_); }

  void all_reduce(at::Tensor& x) {
    FASTGEN_DISPATCH_FLOAT(x.scalar_type(), "shm_all_reduce", [&] {
      scalar_t* data = x.data_ptr<scalar_t>();
      const int64_t n = x.numel(), per_chunk = buffer_bytes_ / static_cast<int64_t>(sizeof(scalar_t));
      for (int64_t begin = 0; begin < n; begin += per_chunk) {
        const int64_t count = std::min(per_chunk, n - begin);
        const int64_t call = publish(data + begin, count * static_cast<int64_t>(sizeof(scalar_t)));
        std::vector<const scalar_t*> inputs(world_);
        for (int64_t r = 0; r < world_; ++r) inputs[r] = reinterpret_cast<const scalar_t*>(buffer(r, call));
        sum_ranks(data + begin, inputs, count);
      }
    });
  }

  void all_gather(at::Tensor& out, const at::Tensor& x) {
    const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
    const char* in = static_cast<const char*>(x.data_ptr());
    char* o = static_cast<char*>(out.data_ptr());
    for (int64_t begin = 0; begin < bytes; begin += buffer_bytes_) {
      const int64_t count = std::min(buffer_bytes_, bytes - begin);
      const int64_t call = publish(in + begin, count);
      for (int64_t r = 0; r < world_; ++r) std::memcpy(o + r * bytes + begin, buffer(r, call), count);
    }
  }

  void barrier() { publish(nullptr, 0); }
  int64_t world_size() const { return world_; }

  // Rank 0's payload on every rank: each chunk's call carries [total bytes (int64) | data].
  // Ranks other than 0 wait for rank 0 without a time limit when patient (a worker between two
  // steps of an idle server), still failing at once if its process exits.
  at::Tensor broadcast_bytes(const at::Tensor& payload, bool patient) {
    constexpr int64_t kHeader = static_cast<int64_t>(sizeof(int64_t));
    const int64_t room = buffer_bytes_ - kHeader;
    std::vector<char> chunk(rank_ == 0 ? static_cast<size_t>(buffer_bytes_) : 0);
    int64_t total = rank_ == 0 ? payload.numel() : -1;
    at::Tensor out;
    for (int64_t begin = 0;; begin += room) {
      int64_t call;
      if (rank_ == 0) {
        const int64_t count = std::min(room, total - begin);
        std::memcpy(chunk.data(), &total, kHeader);
        if (count > 0) std::memcpy(chunk.data() + kHeader, static_cast<const char*>(payload.data_ptr()) + begin, count);
        call = publish(chunk.data(), kHeader + count, patient);
      } else {
        call = publish(nullptr, 0, patient);
        std::memcpy(&total, buffer(0, call), kHeader);
      }
      if (!out.defined()) out = at::empty({total}, at::TensorOptions().dtype(at::kByte));
      const int64_t count = std::min(room, total - begin);
      if (count > 0) std::memcpy(static_cast<char*>(out.data_ptr()) + begin, buffer(0, call) + kHeader, count);
      if (begin + room >= total) break;
    }
    return out;
  }

 private:
  Header& header() const { return *reinterpret_cast<Header*>(base_); }
  char* slot(int64_t r) const { return base_ + kHeaderBytes + r * slot_bytes_; }
  int64_t& stamp(int64_t r) const { return *reinterpret_cast<int64_t*>(slot(r)); }
  char* buffer(int64_t r, int64_t call) const { return slot(r) + kStampBytes + (call % 2) * buffer_bytes_; }

  // Copies bytes of src into this rank's buffer for the next call, stamps it, and waits until
  // every rank has stamped the same call. Returns the call's number.
  // patient: no time limit on the wait for rank 0 (broadcast_bytes).
  int64_t publish(const void* src, int64_t bytes, bool patient = false) {
    const int64_t call = ++calls_;
    if (bytes > 0) std::memcpy(buffer(rank_, call), src, bytes);
    std::atomic_ref<int64_t>(stamp(rank_)).store(call, std::memory_order_release);
    for (int64_t r = 0; r < world_; ++r) {
      if (r != rank_) wait_for(r, call, patient && r == 0);
    }
    return call;
  }

  void wait_for(int64_t peer, int64_t call, bool patient = false) {
    std::atomic_ref<int64_t> peer_stamp(stamp(peer));
    for (int spin = 0; spin < 4096; ++spin) {
      if (peer_stamp.load(std::memory_order_acquire) >= call) return;
      cpu_relax();
    }
    const auto start = Clock::now();
    auto next_check = start;
    while (peer_stamp.load(std::memory_order_acquire) < call) {
      if (patient && Clock::now() - start > std::chrono::milliseconds(20)) {
        usleep(100);  // idle for a while: stop spinning, keep the latency near 0.1 ms
      } else {
        sched_yield();  // the peer may need this core
      }
      const auto now = Clock::now();
      if (now < next_check) continue;
      next_check = now + std::chrono::milliseconds(50);
      const int64_t pid = header().pids[peer];
      TORCH_CHECK(!process_exited(pid), "tensor-parallel rank ", peer, " (pid ", pid,
                  ") exited; rank ", rank_, " cannot finish the collective");
      TORCH_CHECK(patient || now - start < timeout_, "tensor-parallel rank ", peer, " (pid ", pid,
                  ") did not reach collective ", call, " within ",
                  std::chrono::duration<double>(timeout_).count(), " s (rank ", rank_, " waited)");
    }
  }

  // out[i] = sum over ranks r in order of inputs[r][i], in float32.
  template <typename T>
  void sum_ranks(T* out, const std::vector<const T*>& inputs, int64_t n) {
    const int64_t world = world_;
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + vec::kWidth <= end; i += vec::kWidth) {
        vec::Vec acc = vec::load(inputs[0] + i);
        for (int64_t r = 1; r < world; ++r) acc = acc + vec::load(inputs[r] + i);
        vec::store(out + i, acc);
      }
      if (i < end) {
        const int64_t tail = end - i;
        vec::Vec acc = vec::load(inputs[0] + i, tail);
        for (int64_t r = 1; r < world; ++r) acc = acc + vec::load(inputs[r] + i, tail);
        vec::store(out + i, acc, tail);
      }
    });
  }

  std::string name_;
  int64_t world_, rank_, buffer_bytes_, slot_bytes_ = 0, bytes_ = 0;
  Clock::duration timeout_;
  char* base_ = nullptr;
  int64_t calls_ = 0;
};

std::mutex registry_mutex;
std::vector<std::unique_ptr<ShmGroup>>& registry() {
  static std::vector<std::unique_ptr<ShmGroup>> groups;
  return groups;
}

ShmGroup& group_at(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& groups = registry();
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(groups.size()) && groups[handle],
              "shm group ", handle, " does not exist (destroyed, or never made)");
  return *groups[handle];
}

}  // namespace

int64_t shm_group_init(std::string_view name, int64_t world_size, int64_t rank, int64_t buffer_bytes,
                       double timeout_s) {
  TORCH_CHECK(world_size >= 1 && world_size <= kMaxRanks, "shm_group_init: world_size must be in [1, ",
              kMaxRanks, "], got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size, "shm_group_init: rank ", rank, " is outside a group of ",
              world_size);
  TORCH_CHECK(buffer_bytes >= 64 && buffer_bytes % 64 == 0, "shm_group_init: buffer_bytes must be a "
              "positive multiple of 64, got ", buffer_bytes);
  TORCH_CHECK(timeout_s > 0, "shm_group_init: timeout_s must be > 0, got ", timeout_s);
  TORCH_CHECK(!name.empty() && name.size() < 200 && name.find('/') == std::string_view::npos,
              "shm_group_init: name must be 1-199 characters without '/', got '", name, "'");
  auto group = std::make_unique<ShmGroup>(std::string(name), world_size, rank, buffer_bytes, timeout_s);
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().push_back(std::move(group));
  return static_cast<int64_t>(registry().size()) - 1;
}

void shm_group_destroy(int64_t group) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& groups = registry();
  TORCH_CHECK(group >= 0 && group < static_cast<int64_t>(groups.size()) && groups[group],
              "shm group ", group, " does not exist (destroyed, or never made)");
  groups[group].reset();
}

void shm_all_reduce(at::Tensor& x, int64_t group) {
  TORCH_CHECK(x.is_cpu() && x.is_contiguous(), "shm_all_reduce: x must be a contiguous CPU tensor");
  group_at(group).all_reduce(x);
}

void shm_all_gather(at::Tensor& out, const at::Tensor& x, int64_t group) {
  ShmGroup& g = group_at(group);
  TORCH_CHECK(x.is_cpu() && x.is_contiguous() && out.is_cpu() && out.is_contiguous(),
              "shm_all_gather: out and x must be contiguous CPU tensors");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "shm_all_gather: out dtype ", out.scalar_type(),
              " != x dtype ", x.scalar_type());
  TORCH_CHECK(out.numel() == g.world_size() * x.numel(), "shm_all_gather: out must hold ",
              g.world_size(), " x ", x.numel(), " elements, got ", out.numel());
  g.all_gather(out, x);
}

void shm_barrier(int64_t group) { group_at(group).barrier(); }

at::Tensor shm_broadcast_bytes(const at::Tensor& payload, int64_t group, bool patient) {
  TORCH_CHECK(payload.is_cpu() && payload.is_contiguous() && payload.scalar_type() == at::kByte &&
                  payload.dim() == 1,
              "shm_broadcast_bytes: payload must be a contiguous uint8 [n] CPU tensor");
  return group_at(group).broadcast_bytes(payload, patient);
}

}  // namespace fastgen::cpu
