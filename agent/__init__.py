"""Edge vision agent: frames in, int8 TFLite inference on the device, results out over MQTT or Greengrass IPC."""

__version__ = "0.1.0"
