"""Where messages go: the console, IoT Core over MQTT5, or IoT Core through the Greengrass nucleus."""
