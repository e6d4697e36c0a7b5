/**
 * Crafted target/draft distribution pairs (V = 8) for the acceptance distribution tests, shared by
 * the CPU reference's and the GPU kernel's chi-square tests.
 */

/** A named pair of distributions: p (target) and q (draft). */
export interface DistributionPair {
  name: string;
  p: number[];
  q: number[];
}

/** Pairs covering differing p/q, zeros on either side, and q = p. */
export const PAIRS: readonly DistributionPair[] = [
  {
    name: "p and q differ",
    p: [0.3, 0.05, 0.1, 0.2, 0.05, 0.15, 0.1, 0.05],
    q: [0.1, 0.2, 0.05, 0.3, 0.05, 0.1, 0.05, 0.15],
  },
  {
    name: "q has zeros where p has mass",
    p: [0.1, 0.2, 0.15, 0.05, 0.2, 0.1, 0.1, 0.1],
    q: [0.5, 0.5, 0, 0, 0, 0, 0, 0],
  },
  {
    name: "p has zeros where q has mass",
    p: [0, 0.4, 0, 0.3, 0, 0.2, 0, 0.1],
    q: [0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125],
  },
  {
    name: "q equals p",
    p: [0.05, 0.1, 0.15, 0.2, 0.2, 0.15, 0.1, 0.05],
    q: [0.05, 0.1, 0.15, 0.2, 0.2, 0.15, 0.1, 0.05],
  },
];

/** Trials per pair. */
export const TRIALS = 20000;
