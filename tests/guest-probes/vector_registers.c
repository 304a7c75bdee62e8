/*
 * vector_registers: can one guest process see another's vector registers?
 *
 * Two processes (this one and a child) each keep their own pattern in YMM1, give the CPU
 * away, and check the pattern is still there: a kernel that does not switch the AVX state
 * lets the other process's pattern show through. Run in a one-vCPU guest, the two
 * alternate on each sched_yield. Where user space has no AVX state enabled (XCR0 from
 * XGETBV), there is nothing beyond SSE to share, and the probe only says so.
 *
 * Prints "xcr0 X" and then, where AVX is enabled, "corrupt N of M" per process; exits 1
 * if any pattern changed. Built static by the end-to-end test that runs it (no libc in
 * the test's busybox rootfs).
 */
#include <cpuid.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#define ROUNDS 400

static long check(uint64_t pattern)
{
	uint64_t in[4] = { pattern, pattern + 1, pattern + 2, pattern + 3 }, out[4];
	long bad = 0;

	for (int i = 0; i < ROUNDS; i++) {
		__asm__ volatile("vmovdqu %0, %%ymm1" : : "m"(in) : "xmm1");
		for (volatile int spin = 0; spin < 20000; spin++)
			;
		sched_yield();
		__asm__ volatile("vmovdqu %%ymm1, %0" : "=m"(out));
		if (out[0] != in[0] || out[1] != in[1] || out[2] != in[2] || out[3] != in[3])
			bad++;
	}
	return bad;
}

int main(void)
{
	unsigned a, b, c, d;
	uint32_t lo, hi;

	__cpuid(1, a, b, c, d);
	if (!((c >> 27) & 1)) { /* OSXSAVE clear: no XGETBV, no AVX */
		printf("xcr0 none\n");
		return 0;
	}
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	printf("xcr0 %x\n", lo);
	fflush(stdout);
	if ((lo & 6) != 6)
		return 0;
	pid_t child = fork();
	if (child < 0) {
		perror("fork");
		return 2;
	}
	long bad = check(child == 0 ? 0x1111000000000000ULL : 0x2222000000000000ULL);
	printf("%s: corrupt %ld of %d\n", child == 0 ? "child" : "parent", bad, ROUNDS);
	fflush(stdout);
	if (child == 0)
		_exit(bad ? 1 : 0);
	int status;
	if (waitpid(child, &status, 0) < 0) {
		perror("waitpid");
		return 2;
	}
	return bad || !WIFEXITED(status) || WEXITSTATUS(status) ? 1 : 0;
}
