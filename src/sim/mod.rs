//! The IoT Hub emulator. (being written)
