/* A TFLite external delegate that takes no op: it proves the delegate hook (model.backend.delegate) loads
 * a real shared library through the plugin API and hands it its options, on a machine without an
 * accelerator. Options: "touch" = a file it creates when the interpreter asks it to prepare the graph;
 * "refuse" = "yes" makes it decline to load, reporting why, as a delegate missing its hardware does.
 * Built by tests/test_backends.py with the system C compiler; the struct below is TfLiteDelegate from
 * tensorflow/lite/core/c/common.h (fields zeroed past it, as the runtime expects of unused ones). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

typedef int TfLiteStatus; /* kTfLiteOk = 0, kTfLiteError = 1 */

typedef struct TfLiteDelegate {
  void* data_;
  TfLiteStatus (*Prepare)(void* context, struct TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
  char spare[128];
} TfLiteDelegate;

static TfLiteStatus prepare(void* context, TfLiteDelegate* delegate) {
  (void)context;
  const char* touch = (const char*)delegate->data_;
  if (touch[0] != '\0') {
    FILE* marker = fopen(touch, "w");
    if (marker == NULL) return 1;
    fputs("prepared\n", marker);
    fclose(marker);
  }
  return 0; /* claims no node: every op stays on the CPU kernels */
}

TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t count, void (*report_error)(const char*)) {
  const char* touch = "";
  for (size_t i = 0; i < count; i++) {
    if (strcmp(keys[i], "refuse") == 0 && strcmp(values[i], "yes") == 0) {
      report_error("no accelerator attached (refuse=yes)");
      return NULL;
    }
    if (strcmp(keys[i], "touch") == 0) touch = values[i];
  }
  TfLiteDelegate* delegate = calloc(1, sizeof(TfLiteDelegate));
  delegate->data_ = strdup(touch);
  delegate->Prepare = prepare;
  return delegate;
}

void tflite_plugin_destroy_delegate(TfLiteDelegate* delegate) {
  if (delegate == NULL) return; /* the Python wrapper calls this after a refusal too */
  free(delegate->data_);
  free(delegate);
}
