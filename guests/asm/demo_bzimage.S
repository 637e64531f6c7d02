/* DEMO guest, bzImage format: the guest `atrium` boots with no arguments. */
#include "defs.inc"
#include "setup.inc"
#include "entry64.inc"
#include "common.inc"
#include "acpi.inc"
#include "demo.inc"
