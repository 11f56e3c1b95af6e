/* check.h — the few lines of test harness the C tests share. */
#ifndef ZM_TEST_CHECK_H
#define ZM_TEST_CHECK_H
#include <stdio.h>

static int passed, failed;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (cond) passed++;                                                          \
        else {                                                                       \
            failed++;                                                                \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

static int check_summary(void) {
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
#endif
