/*
 * ptemu_all.c -- the whole C core as one translation unit.
 *
 * The batch loops (batch.c) call the walk (walk.c), which calls the TLB
 * (tlb.c) once per access; compiled together, the compiler inlines them and
 * hoists what a batch never changes (no TLB, NXE, eager-A...) out of the
 * loop.  Each file still compiles on its own.
 */
#include "tlb.c"
#include "ept.c"
#include "walk.c"
#include "batch.c"
#include "physmap.c"
#include "ucfill.c"
#include "shadow.c"
#include "paravirt.c"
