// CPU policy step: forward (denoised output, next state, per-row mean Gaussian log-prob) and backward
// (the gradients of those outputs with respect to the model output and the state x).
//
// Numerics follow policy_step_reference with compute_dtype equal to the element type T: every
// element's math runs in T in the reference's operation order (the build disables FMA contraction, so
// denoised and next_state match it bit for bit); the squared residuals are summed in double.
// Work is split into (row, chunk) items with fixed chunk boundaries and reduced in a fixed order, so
// the results do not depend on the thread count.
#include "policy_step.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

namespace rlcm_fast {
namespace {

// Must match rlcm_fast/policy_step.py: PREDICTION_TYPES order and the ROW_SCALARS columns.
enum class Prediction : int { epsilon = 0, v_prediction = 1, sample = 2 };
constexpr int kRowScalarCount = 6;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)

// Elements per work item: large enough to amortise scheduling, small enough to split a single latent
// (4 x 96 x 96 = 36864 elements) across cores.
constexpr int64_t kChunkElements = 8192;
// Spawning a thread costs tens of microseconds; give each thread at least this much work.
constexpr int64_t kMinElementsPerThread = 65536;
// Independent double accumulators per chunk, so the squared-residual sum is not one serial chain.
constexpr int64_t kAccumulatorLanes = 8;
static_assert(kChunkElements % kAccumulatorLanes == 0, "chunks must hold whole accumulator blocks");

template <typename T>
struct RowScalars {
    // Rounded to T first, as the reference does with scalars.to(compute_dtype).
    T alpha_t, sigma_t, c_skip, c_out, alpha_next, sigma_next;

    explicit RowScalars(const double* row)
        : alpha_t(static_cast<T>(row[0])),
          sigma_t(static_cast<T>(row[1])),
          c_skip(static_cast<T>(row[2])),
          c_out(static_cast<T>(row[3])),
          alpha_next(static_cast<T>(row[4])),
          sigma_next(static_cast<T>(row[5])) {}
};

template <typename T, Prediction P>
inline T denoised_value(T model_output, T x, const RowScalars<T>& s) {
    T pred_original;
    if constexpr (P == Prediction::epsilon) {
        pred_original = (x - s.sigma_t * model_output) / s.alpha_t;
    } else if constexpr (P == Prediction::v_prediction) {
        pred_original = s.alpha_t * x - s.sigma_t * model_output;
    } else {
        pred_original = model_output;
    }
    return s.c_out * pred_original + s.c_skip * x;
}

// d(denoised)/d(model_output) for one row, in double.
inline double denoised_gain(const double* row, Prediction prediction) {
    const double alpha_t = row[0], sigma_t = row[1], c_out = row[3];
    switch (prediction) {
        case Prediction::epsilon: return -c_out * sigma_t / alpha_t;
        case Prediction::v_prediction: return -c_out * sigma_t;
        case Prediction::sample: return c_out;
    }
    return 0.0;  // unreachable: prediction is validated before dispatch
}

// std of the row's Gaussian as the reference sees it (sigma_next rounded to T), in double.
template <typename T>
inline double policy_std(const double* row) {
    return static_cast<double>(static_cast<T>(row[5]));
}

int resolve_thread_count(int requested, int64_t num_items, int64_t total_elements) {
    int64_t threads = requested > 0 ? requested : static_cast<int64_t>(std::thread::hardware_concurrency());
    threads = std::min({std::max<int64_t>(threads, 1), num_items,
                        std::max<int64_t>(total_elements / kMinElementsPerThread, 1)});
    return static_cast<int>(std::max<int64_t>(threads, 1));
}

// Runs body(item) for item in [0, num_items) on up to num_threads threads (the caller included).
template <typename Body>
void parallel_for(int64_t num_items, int num_threads, const Body& body) {
    if (num_threads <= 1) {
        for (int64_t item = 0; item < num_items; ++item) body(item);
        return;
    }
    std::atomic<int64_t> next_item{0};
    auto worker = [&] {
        for (int64_t item = next_item.fetch_add(1); item < num_items; item = next_item.fetch_add(1)) {
            body(item);
        }
    };
    std::vector<std::thread> helpers;
    helpers.reserve(num_threads - 1);
    for (int t = 1; t < num_threads; ++t) {
        try {
            helpers.emplace_back(worker);
        } catch (const std::system_error&) {
            break;  // out of threads: the ones already running and the caller finish the work
        }
    }
    worker();
    for (auto& helper : helpers) helper.join();
}

struct Layout {
    int64_t rows;
    int64_t row_size;
    int64_t chunks_per_row;
    int num_threads;
};

Layout make_layout(int64_t rows, int64_t row_size, int num_threads) {
    if (rows < 0) throw std::invalid_argument("rows must be >= 0, got " + std::to_string(rows));
    if (row_size <= 0) throw std::invalid_argument("row_size must be > 0, got " + std::to_string(row_size));
    if (num_threads < 0) {
        throw std::invalid_argument("num_threads must be >= 0 (0 = all cores), got " + std::to_string(num_threads));
    }
    const int64_t chunks_per_row = (row_size + kChunkElements - 1) / kChunkElements;
    const int64_t num_items = rows * chunks_per_row;
    return {rows, row_size, chunks_per_row, resolve_thread_count(num_threads, num_items, rows * row_size)};
}

Prediction to_prediction(int prediction_type) {
    if (prediction_type < 0 || prediction_type > 2) {
        throw std::invalid_argument("prediction_type must be 0 (epsilon), 1 (v_prediction) or 2 (sample), got " +
                                    std::to_string(prediction_type));
    }
    return static_cast<Prediction>(prediction_type);
}

void require_pointer(std::uintptr_t address, const char* name) {
    if (address == 0) throw std::invalid_argument(std::string(name) + " must not be a null pointer");
}

template <typename T>
struct ForwardBuffers {
    const T* model_output;
    const T* x;
    const T* noise;   // sampling mode only
    T* next_state;    // written in sampling mode, read in training mode
    const double* scalars;
    T* denoised;
};

// Writes denoised (and next_state when sampling) for [begin, end) of one row; returns the double sum
// of squared residuals (next_state - mean)^2 over that range. Two passes over a chunk-sized buffer keep
// both loops simple enough for the compiler to vectorise.
template <typename T, Prediction P, bool kSampling>
double forward_chunk(const ForwardBuffers<T>& buffers, const RowScalars<T>& s, int64_t begin, int64_t end) {
    T residuals[kChunkElements];
    const int64_t count = end - begin;
    const T* model_output = buffers.model_output + begin;
    const T* x = buffers.x + begin;
    T* denoised = buffers.denoised + begin;
    T* next_state = buffers.next_state + begin;
    for (int64_t i = 0; i < count; ++i) {
        const T value = denoised_value<T, P>(model_output[i], x[i], s);
        denoised[i] = value;
        const T mean = s.alpha_next * value;
        if constexpr (kSampling) {
            const T next = mean + s.sigma_next * buffers.noise[begin + i];
            next_state[i] = next;
            residuals[i] = next - mean;
        } else {
            residuals[i] = next_state[i] - mean;
        }
    }
    double lane_sums[kAccumulatorLanes] = {};
    int64_t i = 0;
    for (; i + kAccumulatorLanes <= count; i += kAccumulatorLanes) {
        for (int64_t lane = 0; lane < kAccumulatorLanes; ++lane) {
            const double residual = static_cast<double>(residuals[i + lane]);
            lane_sums[lane] += residual * residual;
        }
    }
    for (int64_t lane = 0; i < count; ++i, ++lane) {
        const double residual = static_cast<double>(residuals[i]);
        lane_sums[lane] += residual * residual;
    }
    double total = 0.0;
    for (double lane_sum : lane_sums) total += lane_sum;
    return total;
}

template <typename T, Prediction P, bool kSampling>
void forward_rows(const ForwardBuffers<T>& buffers, T* logp, const Layout& layout) {
    std::vector<double> chunk_sums(static_cast<size_t>(layout.rows * layout.chunks_per_row));
    parallel_for(layout.rows * layout.chunks_per_row, layout.num_threads, [&](int64_t item) {
        const int64_t row = item / layout.chunks_per_row;
        const int64_t begin = row * layout.row_size + (item % layout.chunks_per_row) * kChunkElements;
        const int64_t end = std::min(begin + kChunkElements, (row + 1) * layout.row_size);
        const RowScalars<T> s(buffers.scalars + row * kRowScalarCount);
        chunk_sums[item] = forward_chunk<T, P, kSampling>(buffers, s, begin, end);
    });
    for (int64_t row = 0; row < layout.rows; ++row) {
        double sum = 0.0;
        for (int64_t chunk = 0; chunk < layout.chunks_per_row; ++chunk) {
            sum += chunk_sums[row * layout.chunks_per_row + chunk];
        }
        const double std_dev = policy_std<T>(buffers.scalars + row * kRowScalarCount);
        const double mean_square = sum / static_cast<double>(layout.row_size);
        logp[row] = static_cast<T>(-mean_square / (2.0 * std_dev * std_dev) - std::log(std_dev) - kLogSqrt2Pi);
    }
}

template <typename T>
void policy_step_forward(std::uintptr_t model_output, std::uintptr_t x, std::uintptr_t noise,
                         std::uintptr_t next_state, std::uintptr_t scalars, std::uintptr_t denoised,
                         std::uintptr_t logp, int64_t rows, int64_t row_size, int prediction_type,
                         int num_threads) {
    const Layout layout = make_layout(rows, row_size, num_threads);
    const Prediction prediction = to_prediction(prediction_type);
    if (rows == 0) return;
    for (auto [address, name] : {std::pair{model_output, "model_output"}, {x, "x"}, {next_state, "next_state"},
                                 {scalars, "scalars"}, {denoised, "denoised"}, {logp, "logp"}}) {
        require_pointer(address, name);
    }
    const ForwardBuffers<T> buffers{reinterpret_cast<const T*>(model_output), reinterpret_cast<const T*>(x),
                                    reinterpret_cast<const T*>(noise), reinterpret_cast<T*>(next_state),
                                    reinterpret_cast<const double*>(scalars), reinterpret_cast<T*>(denoised)};
    T* logp_out = reinterpret_cast<T*>(logp);
    const bool sampling = noise != 0;
    switch (prediction) {
        case Prediction::epsilon:
            return sampling ? forward_rows<T, Prediction::epsilon, true>(buffers, logp_out, layout)
                            : forward_rows<T, Prediction::epsilon, false>(buffers, logp_out, layout);
        case Prediction::v_prediction:
            return sampling ? forward_rows<T, Prediction::v_prediction, true>(buffers, logp_out, layout)
                            : forward_rows<T, Prediction::v_prediction, false>(buffers, logp_out, layout);
        case Prediction::sample:
            return sampling ? forward_rows<T, Prediction::sample, true>(buffers, logp_out, layout)
                            : forward_rows<T, Prediction::sample, false>(buffers, logp_out, layout);
    }
}

template <typename T>
struct BackwardBuffers {
    const T* model_output;  // read only with the log-prob term
    const T* x;             // read only with the log-prob term
    const T* next_state;    // read only with the log-prob term
    const double* scalars;
    const double* grad_logp;  // null: no log-prob term (sampling mode, where logp does not depend on the inputs)
    const T* grad_denoised;   // null when absent
    const T* grad_next;       // sampling mode's next-state gradient; null when absent
    T* grad_model_output;     // null when not wanted
    T* grad_x;                // null when not wanted
};

// d(denoised)/d(x) for one row, in double.
inline double state_gain(const double* row, Prediction prediction) {
    const double alpha_t = row[0], c_skip = row[2], c_out = row[3];
    switch (prediction) {
        case Prediction::epsilon: return c_out / alpha_t + c_skip;
        case Prediction::v_prediction: return c_out * alpha_t + c_skip;
        case Prediction::sample: return c_skip;
    }
    return 0.0;  // unreachable: prediction is validated before dispatch
}

// Every gradient reaches the inputs through the denoised output D (mean = alpha_next D, and in sampling mode
// next_state = mean + sigma_next z), so per element:
//   grad_D = alpha_next * grad_logp * (next_state - mean) / (std^2 n)   (training: the stored action's score)
//          + grad_denoised + alpha_next * grad_next                   (sampling: the pathwise gradient)
//   grad_model_output = dD/dmodel_output * grad_D,   grad_x = dD/dx * grad_D
// with the per-row factors formed in double and rounded once to T, and the residual recomputed in T exactly
// as in the forward pass. Which terms exist is a template parameter: the loop stays branch-free, and so
// vectorised (with runtime tests in the loop it ran 3x slower).
template <typename T, Prediction P, bool kLogp, bool kGradDenoised, bool kGradNext>
void backward_chunk(const BackwardBuffers<T>& buffers, int64_t row, int64_t row_size, int64_t begin, int64_t end) {
    const double* row_scalars = buffers.scalars + row * kRowScalarCount;
    const RowScalars<T> s(row_scalars);
    const double std_dev = policy_std<T>(row_scalars);
    T residual_factor = T(0);
    if constexpr (kLogp) {
        residual_factor = static_cast<T>(row_scalars[4] * buffers.grad_logp[row] /
                                         (std_dev * std_dev * static_cast<double>(row_size)));
    }
    const T model_output_gain = static_cast<T>(denoised_gain(row_scalars, P));
    const T x_gain = static_cast<T>(state_gain(row_scalars, P));
    const auto grad_denoised_at = [&](int64_t i) {
        T grad = T(0);
        if constexpr (kLogp) {
            const T mean = s.alpha_next * denoised_value<T, P>(buffers.model_output[i], buffers.x[i], s);
            grad += residual_factor * (buffers.next_state[i] - mean);
        }
        if constexpr (kGradDenoised) grad += buffers.grad_denoised[i];
        if constexpr (kGradNext) grad += s.alpha_next * buffers.grad_next[i];
        return grad;
    };
    T* grad_model_output = buffers.grad_model_output;
    T* grad_x = buffers.grad_x;
    if (grad_model_output != nullptr && grad_x != nullptr) {
        for (int64_t i = begin; i < end; ++i) {
            const T grad = grad_denoised_at(i);
            grad_model_output[i] = model_output_gain * grad;
            grad_x[i] = x_gain * grad;
        }
    } else if (grad_model_output != nullptr) {
        for (int64_t i = begin; i < end; ++i) grad_model_output[i] = model_output_gain * grad_denoised_at(i);
    } else {
        for (int64_t i = begin; i < end; ++i) grad_x[i] = x_gain * grad_denoised_at(i);
    }
}

template <typename T, Prediction P, bool kLogp, bool kGradDenoised, bool kGradNext>
void backward_rows(const BackwardBuffers<T>& buffers, const Layout& layout) {
    parallel_for(layout.rows * layout.chunks_per_row, layout.num_threads, [&](int64_t item) {
        const int64_t row = item / layout.chunks_per_row;
        const int64_t begin = row * layout.row_size + (item % layout.chunks_per_row) * kChunkElements;
        const int64_t end = std::min(begin + kChunkElements, (row + 1) * layout.row_size);
        backward_chunk<T, P, kLogp, kGradDenoised, kGradNext>(buffers, row, layout.row_size, begin, end);
    });
}

// backward_rows with the three term flags as compile-time constants.
template <typename T, Prediction P>
void backward_rows_for_terms(const BackwardBuffers<T>& buffers, const Layout& layout) {
    const bool logp = buffers.grad_logp != nullptr, denoised = buffers.grad_denoised != nullptr;
    const bool next = buffers.grad_next != nullptr;
    const auto run = [&](auto has_logp, auto has_denoised, auto has_next) {
        backward_rows<T, P, decltype(has_logp)::value, decltype(has_denoised)::value, decltype(has_next)::value>(
            buffers, layout);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (logp) {
        if (denoised) return next ? run(Yes{}, Yes{}, Yes{}) : run(Yes{}, Yes{}, No{});
        return next ? run(Yes{}, No{}, Yes{}) : run(Yes{}, No{}, No{});
    }
    if (denoised) return next ? run(No{}, Yes{}, Yes{}) : run(No{}, Yes{}, No{});
    return next ? run(No{}, No{}, Yes{}) : run(No{}, No{}, No{});
}

template <typename T>
void policy_step_backward(std::uintptr_t model_output, std::uintptr_t x, std::uintptr_t next_state,
                          std::uintptr_t scalars, std::uintptr_t grad_logp, std::uintptr_t grad_denoised,
                          std::uintptr_t grad_next, std::uintptr_t grad_model_output, std::uintptr_t grad_x,
                          int64_t rows, int64_t row_size, int prediction_type, int num_threads) {
    const Layout layout = make_layout(rows, row_size, num_threads);
    const Prediction prediction = to_prediction(prediction_type);
    if (rows == 0) return;
    require_pointer(scalars, "scalars");
    if (grad_logp != 0) {  // the log-prob term recomputes the residual from the inputs
        for (auto [address, name] : {std::pair{model_output, "model_output"}, {x, "x"}, {next_state, "next_state"}}) {
            require_pointer(address, name);
        }
    }
    if (grad_model_output == 0 && grad_x == 0) {
        throw std::invalid_argument("grad_model_output and grad_x must not both be null pointers");
    }
    const BackwardBuffers<T> buffers{reinterpret_cast<const T*>(model_output),
                                     reinterpret_cast<const T*>(x),
                                     reinterpret_cast<const T*>(next_state),
                                     reinterpret_cast<const double*>(scalars),
                                     reinterpret_cast<const double*>(grad_logp),
                                     reinterpret_cast<const T*>(grad_denoised),
                                     reinterpret_cast<const T*>(grad_next),
                                     reinterpret_cast<T*>(grad_model_output),
                                     reinterpret_cast<T*>(grad_x)};
    switch (prediction) {
        case Prediction::epsilon: return backward_rows_for_terms<T, Prediction::epsilon>(buffers, layout);
        case Prediction::v_prediction: return backward_rows_for_terms<T, Prediction::v_prediction>(buffers, layout);
        case Prediction::sample: return backward_rows_for_terms<T, Prediction::sample>(buffers, layout);
    }
}

template <typename T>
void bind_for_element_type(pybind11::module_& module, const std::string& suffix) {
    namespace py = pybind11;
    module.def(("policy_step_forward_" + suffix).c_str(), &policy_step_forward<T>,
               py::arg("model_output"), py::arg("x"), py::arg("noise"), py::arg("next_state"), py::arg("scalars"),
               py::arg("denoised"), py::arg("logp"), py::arg("rows"), py::arg("row_size"),
               py::arg("prediction_type"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
               ("Policy step forward on contiguous " + suffix +
                " buffers given as addresses. noise != 0: sampling mode, writes next_state; noise == 0: "
                "training mode, reads next_state. scalars: (rows, 6) float64. Writes denoised and logp "
                "(rows values, " + suffix + ", accumulated in double).")
                   .c_str());
    module.def(("policy_step_backward_" + suffix).c_str(), &policy_step_backward<T>,
               py::arg("model_output"), py::arg("x"), py::arg("next_state"), py::arg("scalars"),
               py::arg("grad_logp"), py::arg("grad_denoised"), py::arg("grad_next"), py::arg("grad_model_output"),
               py::arg("grad_x"), py::arg("rows"), py::arg("row_size"), py::arg("prediction_type"),
               py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
               ("Policy step backward on contiguous " + suffix +
                " buffers given as addresses: writes grad_model_output and/or grad_x (0: not wanted). "
                "grad_logp: rows float64 values, or 0 for no log-prob term (then model_output, x and "
                "next_state are not read); grad_denoised and grad_next may be 0 (absent).")
                   .c_str());
}

}  // namespace

void bind_policy_step(pybind11::module_& module) {
    bind_for_element_type<float>(module, "float32");
    bind_for_element_type<double>(module, "float64");
}

}  // namespace rlcm_fast
