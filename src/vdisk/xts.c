/* The part of AES-XTS that is not AES, for vdisk.crypto (built on first use by vdisk.native).
 *
 * XTS encrypts block j of a sector as E(P ^ T_j) ^ T_j, with T_0 the sector's IV encrypted
 * under the tweak key and T_j = T_0 * x^j in GF(2^128) (x^128 = x^7 + x^2 + x + 1; the
 * 128-bit value is little-endian, as IEEE P1619 and dm-crypt store it). vdisk.crypto does the
 * AES (one ECB pass per batch, through cryptography) and calls these around it, without the
 * GIL. Little-endian hosts only (the caller checks).
 *
 * The tweaks go into a table first and are then XORed in by a plain loop that the compiler
 * vectorizes: a loop that did both ran at a quarter of the speed (measured, gcc 12 -O3).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The plain64 IVs of `count` sectors from `sector` (plain: mask 0xffffffff), 16 bytes each:
 * the sector number, little-endian, zero-padded. */
void xts_ivs(uint64_t *ivs, uint64_t sector, size_t count, uint64_t mask)
{
	for (size_t i = 0; i < count; i++) {
		*ivs++ = (sector + i) & mask;
		*ivs++ = 0;
	}
}

/* tweaks[2 * (s * blocks + j) ...] = T_j of sector s, from first[16 * s] = its T_0. */
void xts_tweaks(uint64_t *tweaks, const uint8_t *first, size_t sectors, size_t blocks)
{
	for (size_t s = 0; s < sectors; s++) {
		uint64_t lo, hi;
		memcpy(&lo, first + 16 * s, 8);
		memcpy(&hi, first + 16 * s + 8, 8);
		for (size_t j = 0; j < blocks; j++) {
			*tweaks++ = lo;
			*tweaks++ = hi;
			uint64_t fold = (uint64_t)((int64_t)hi >> 63) & 0x87;
			hi = (hi << 1) | (lo >> 63);
			lo = (lo << 1) ^ fold;
		}
	}
}

/* dst = a ^ b, `words` 64-bit words; dst may be a. */
void xor_words(uint64_t *dst, const uint64_t *a, const uint64_t *b, size_t words)
{
	for (size_t i = 0; i < words; i++)
		dst[i] = a[i] ^ b[i];
}
