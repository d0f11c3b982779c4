// rlcm_fast._nvjpeg: JPEG byte counts of uint8 RGB images that stay on the GPU (the jpeg rewards'
// nvjpeg backend, README, "Rewards"). Raw device pointer, shape and CUDA stream in; one size per
// image out; the compressed bytes never leave the device.
//
// libnvjpeg is dlopen-ed at run time from a path the Python side finds (the nvidia-nvjpeg wheel), so the
// module does not link nvjpeg, and makes no CUDA runtime call: libnvjpeg carries its own runtime
// statically, and the one driver call needed (stream synchronisation) comes from libcuda.so.1, which
// every CUDA process has. So one build works with torch's CUDA 12 or 13 and the matching nvjpeg wheel.
// nvjpeg.h and cuda_runtime_api.h are needed only for the types at build time.
#include <dlfcn.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <nvjpeg.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace {

// The nvJPEG entry points used here, resolved by name (signatures from nvjpeg.h, stable since CUDA 11).
struct NvjpegApi {
    decltype(&nvjpegCreateSimple) create_simple;
    decltype(&nvjpegDestroy) destroy;
    decltype(&nvjpegEncoderStateCreate) state_create;
    decltype(&nvjpegEncoderStateDestroy) state_destroy;
    decltype(&nvjpegEncoderParamsCreate) params_create;
    decltype(&nvjpegEncoderParamsDestroy) params_destroy;
    decltype(&nvjpegEncoderParamsSetQuality) set_quality;
    decltype(&nvjpegEncoderParamsSetSamplingFactors) set_sampling;
    decltype(&nvjpegEncoderParamsSetOptimizedHuffman) set_optimized_huffman;
    decltype(&nvjpegEncodeImage) encode_image;
    decltype(&nvjpegEncodeYUV) encode_yuv;
    decltype(&nvjpegEncodeRetrieveBitstream) retrieve_bitstream;
};

using StreamSynchronize = int (*)(void*);  // the driver's cuStreamSynchronize(CUstream): CUresult

template <typename F>
void resolve(void* library, const char* name, F& slot) {
    void* symbol = dlsym(library, name);
    if (symbol == nullptr) {
        throw std::runtime_error(std::string("libnvjpeg has no symbol ") + name);
    }
    slot = reinterpret_cast<F>(symbol);
}

void check(nvjpegStatus_t status, const char* what) {
    if (status != NVJPEG_STATUS_SUCCESS) {
        throw std::runtime_error(std::string(what) + " failed with nvjpegStatus " + std::to_string(status));
    }
}

cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

class SizeEncoder {
public:
    // quality 1..100; 4:2:0 chroma subsampling and standard (not optimised) Huffman tables: Pillow's
    // defaults, so sizes are comparable with the pillow backend. Create it with the target device current.
    SizeEncoder(const std::string& library_path, int quality) {
        if (quality < 1 || quality > 100) {
            throw std::invalid_argument("quality must be in 1..100, got " + std::to_string(quality));
        }
        // A constructor that throws gets no destructor call: release what was created so far by hand.
        try {
            open(library_path, quality);
        } catch (...) {
            release();
            throw;
        }
    }

    ~SizeEncoder() { release(); }

    SizeEncoder(const SizeEncoder&) = delete;
    SizeEncoder& operator=(const SizeEncoder&) = delete;

    // `pixels`: device address of count x 3 x height x width uint8 (planar RGB, contiguous), read on
    // `stream`. Returns the JPEG size in bytes of each image. Encodes every image first (one encoder
    // state each, kept for the next call), then waits once and reads the lengths.
    std::vector<std::size_t> encode_sizes(std::uintptr_t pixels, std::int64_t count, std::int64_t height,
                                          std::int64_t width, std::uintptr_t stream_handle) {
        std::lock_guard<std::mutex> guard(mutex_);
        cudaStream_t stream = as_stream(stream_handle);
        encode(Planes::rgb(pixels, height, width), count, height, width, stream);
        return sizes(count, stream);
    }

    // The same from ready YCbCr 4:2:0 planes (contiguous uint8): luma `y` count x height x width, chroma
    // `cb` and `cr` count x ceil(height / 2) x ceil(width / 2). nvJPEG then converts nothing and only
    // codes them (rlcm_fast/rewards/jpeg_colour.py computes them as libjpeg does).
    std::vector<std::size_t> encode_sizes_ycbcr420(std::uintptr_t y, std::uintptr_t cb, std::uintptr_t cr,
                                                   std::int64_t count, std::int64_t height, std::int64_t width,
                                                   std::uintptr_t stream_handle) {
        if (count > 0 && (cb == 0 || cr == 0)) {
            throw std::invalid_argument("encode_sizes_ycbcr420: need cb != 0 and cr != 0");
        }
        std::lock_guard<std::mutex> guard(mutex_);
        cudaStream_t stream = as_stream(stream_handle);
        encode(Planes::ycbcr420(y, cb, cr, height, width), count, height, width, stream);
        return sizes(count, stream);
    }

    // The whole JPEG file of one image (3 x height x width, as above): for checking the encoder against
    // Pillow's (its tables, its decoded pixels), not for the reward, whose bytes never leave the device.
    std::string encode_file(std::uintptr_t pixels, std::int64_t height, std::int64_t width,
                            std::uintptr_t stream_handle) {
        std::lock_guard<std::mutex> guard(mutex_);
        cudaStream_t stream = as_stream(stream_handle);
        encode(Planes::rgb(pixels, height, width), 1, height, width, stream);
        std::size_t length = 0;
        check(api_.retrieve_bitstream(handle_, states_[0], nullptr, &length, stream), "nvjpegEncodeRetrieveBitstream");
        std::string file(length, '\0');
        check(api_.retrieve_bitstream(handle_, states_[0], reinterpret_cast<unsigned char*>(&file[0]), &length,
                                      stream),
              "nvjpegEncodeRetrieveBitstream");
        file.resize(length);
        return file;
    }

private:
    // Where image i's planes are, and whether nvJPEG gets RGB to convert or ready YCbCr 4:2:0.
    struct Planes {
        unsigned char* base[3];
        std::size_t plane_bytes[3];  // one image's plane, per channel
        std::size_t pitch[3];
        bool ready_ycbcr420;

        static Planes rgb(std::uintptr_t pixels, std::int64_t height, std::int64_t width) {
            const std::size_t plane = static_cast<std::size_t>(height) * static_cast<std::size_t>(width);
            auto* first = reinterpret_cast<unsigned char*>(pixels);
            // Image i's channel c is plane 3 i + c: per channel, base c and a stride of three planes.
            return {{first, first + plane, first + 2 * plane}, {3 * plane, 3 * plane, 3 * plane},
                    {static_cast<std::size_t>(width), static_cast<std::size_t>(width), static_cast<std::size_t>(width)},
                    false};
        }

        static Planes ycbcr420(std::uintptr_t y, std::uintptr_t cb, std::uintptr_t cr, std::int64_t height,
                               std::int64_t width) {
            const std::size_t chroma_width = static_cast<std::size_t>((width + 1) / 2);
            const std::size_t luma = static_cast<std::size_t>(height) * static_cast<std::size_t>(width);
            const std::size_t chroma = static_cast<std::size_t>((height + 1) / 2) * chroma_width;
            return {{reinterpret_cast<unsigned char*>(y), reinterpret_cast<unsigned char*>(cb),
                     reinterpret_cast<unsigned char*>(cr)},
                    {luma, chroma, chroma},
                    {static_cast<std::size_t>(width), chroma_width, chroma_width},
                    true};
        }
    };

    // Encodes `count` images into states_[0 .. count) and waits for the stream. Caller holds mutex_.
    void encode(const Planes& planes, std::int64_t count, std::int64_t height, std::int64_t width,
                cudaStream_t stream) {
        if (count < 0 || height < 1 || width < 1 || (count > 0 && planes.base[0] == nullptr)) {
            throw std::invalid_argument("encode: need pixels != 0, count >= 0, height >= 1, width >= 1");
        }
        while (states_.size() < static_cast<std::size_t>(count)) {
            nvjpegEncoderState_t state = nullptr;
            check(api_.state_create(handle_, &state, stream), "nvjpegEncoderStateCreate");
            states_.push_back(state);
        }
        for (std::int64_t i = 0; i < count; ++i) {
            nvjpegImage_t image{};
            for (int c = 0; c < 3; ++c) {
                image.channel[c] = planes.base[c] + static_cast<std::size_t>(i) * planes.plane_bytes[c];
                image.pitch[c] = planes.pitch[c];
            }
            if (planes.ready_ycbcr420) {
                check(api_.encode_yuv(handle_, states_[i], params_, &image, NVJPEG_CSS_420, static_cast<int>(width),
                                      static_cast<int>(height), stream),
                      "nvjpegEncodeYUV");
            } else {
                check(api_.encode_image(handle_, states_[i], params_, &image, NVJPEG_INPUT_RGB,
                                        static_cast<int>(width), static_cast<int>(height), stream),
                      "nvjpegEncodeImage");
            }
        }
        if (stream_synchronize_(stream) != 0) {
            throw std::runtime_error("cuStreamSynchronize failed after encoding");
        }
    }

    // The byte counts of the first `count` states' bitstreams (after encode).
    std::vector<std::size_t> sizes(std::int64_t count, cudaStream_t stream) {
        std::vector<std::size_t> result(static_cast<std::size_t>(count));
        for (std::int64_t i = 0; i < count; ++i) {
            check(api_.retrieve_bitstream(handle_, states_[i], nullptr, &result[i], stream),
                  "nvjpegEncodeRetrieveBitstream");
        }
        return result;
    }

    void open(const std::string& library_path, int quality) {
        library_ = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (library_ == nullptr) {
            throw std::runtime_error("cannot load " + library_path + ": " + dlerror());
        }
        driver_ = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (driver_ == nullptr) {
            throw std::runtime_error(std::string("cannot load the CUDA driver libcuda.so.1: ") + dlerror());
        }
        void* sync = dlsym(driver_, "cuStreamSynchronize");
        if (sync == nullptr) {
            throw std::runtime_error("libcuda.so.1 has no symbol cuStreamSynchronize");
        }
        stream_synchronize_ = reinterpret_cast<StreamSynchronize>(sync);
        resolve(library_, "nvjpegCreateSimple", api_.create_simple);
        resolve(library_, "nvjpegDestroy", api_.destroy);
        resolve(library_, "nvjpegEncoderStateCreate", api_.state_create);
        resolve(library_, "nvjpegEncoderStateDestroy", api_.state_destroy);
        resolve(library_, "nvjpegEncoderParamsCreate", api_.params_create);
        resolve(library_, "nvjpegEncoderParamsDestroy", api_.params_destroy);
        resolve(library_, "nvjpegEncoderParamsSetQuality", api_.set_quality);
        resolve(library_, "nvjpegEncoderParamsSetSamplingFactors", api_.set_sampling);
        resolve(library_, "nvjpegEncoderParamsSetOptimizedHuffman", api_.set_optimized_huffman);
        resolve(library_, "nvjpegEncodeImage", api_.encode_image);
        resolve(library_, "nvjpegEncodeYUV", api_.encode_yuv);
        resolve(library_, "nvjpegEncodeRetrieveBitstream", api_.retrieve_bitstream);

        check(api_.create_simple(&handle_), "nvjpegCreateSimple");
        check(api_.params_create(handle_, &params_, nullptr), "nvjpegEncoderParamsCreate");
        check(api_.set_quality(params_, quality, nullptr), "nvjpegEncoderParamsSetQuality");
        check(api_.set_sampling(params_, NVJPEG_CSS_420, nullptr), "nvjpegEncoderParamsSetSamplingFactors");
        check(api_.set_optimized_huffman(params_, 0, nullptr), "nvjpegEncoderParamsSetOptimizedHuffman");
    }

    // Destroys the nvJPEG objects created so far (any of them may be null). The libraries stay loaded:
    // nvJPEG may have registered process-lifetime state.
    void release() {
        for (nvjpegEncoderState_t state : states_) api_.state_destroy(state);
        states_.clear();
        if (params_ != nullptr) api_.params_destroy(params_);
        params_ = nullptr;
        if (handle_ != nullptr) api_.destroy(handle_);
        handle_ = nullptr;
    }

    void* library_ = nullptr;
    void* driver_ = nullptr;
    NvjpegApi api_{};
    StreamSynchronize stream_synchronize_ = nullptr;
    nvjpegHandle_t handle_ = nullptr;
    nvjpegEncoderParams_t params_ = nullptr;
    std::vector<nvjpegEncoderState_t> states_;
    std::mutex mutex_;
};

}  // namespace

PYBIND11_MODULE(_nvjpeg, module) {
    module.doc() = "JPEG sizes of GPU-resident images through nvJPEG (raw-pointer interface; use rlcm_fast.rewards)";
    py::class_<SizeEncoder>(module, "SizeEncoder")
        .def(py::init<const std::string&, int>(), py::arg("library_path"), py::arg("quality"))
        .def("encode_sizes", &SizeEncoder::encode_sizes, py::arg("pixels"), py::arg("count"), py::arg("height"),
             py::arg("width"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
             "JPEG byte count of each of `count` planar RGB uint8 images at device address `pixels`")
        .def("encode_sizes_ycbcr420", &SizeEncoder::encode_sizes_ycbcr420, py::arg("y"), py::arg("cb"), py::arg("cr"),
             py::arg("count"), py::arg("height"), py::arg("width"), py::arg("stream"),
             py::call_guard<py::gil_scoped_release>(),
             "JPEG byte count of each of `count` images given as YCbCr 4:2:0 planes (uint8) at device addresses")
        .def(
            "encode_file",
            [](SizeEncoder& self, std::uintptr_t pixels, std::int64_t height, std::int64_t width, std::uintptr_t stream) {
                std::string file;
                {
                    py::gil_scoped_release release;
                    file = self.encode_file(pixels, height, width, stream);
                }
                return py::bytes(file);
            },
            py::arg("pixels"), py::arg("height"), py::arg("width"), py::arg("stream"),
            "the JPEG file (bytes) of one planar RGB uint8 image at device address `pixels`");
}
